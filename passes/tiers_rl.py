"""The RL tier planner: a small policy network plays the placement game (simulate.PlanningEnv).

The game (``Game``, the shared PlanningEnv with two more actions and a safer mask) decides each
segment of every streamed item in order of use: KEEP it on the device since its previous
segment, load it with a fixed lead (LEADS), ASAP (as early as free memory and the FIFO copy
stream allow: greedy's rule), FOLLOW (what the greedy planner's plan does for this segment), or
PERSIST (keep it for good). An action is legal only if the undecided segments can still be
loaded on demand afterwards, so a game never dead-ends on overflow; an illegal action ends it
with the failure penalty. The reward is the simulator's time.

The policy scores every legal action from the decision's features (item size and transfer
time against the compute around it, next-use distance, remaining reuses, free device memory
where the action would put it, a running estimate of the copy stream's backlog, the remaining
transfer demand against the remaining compute, bandwidths, position) and the action's own
(type, lead, memory it holds, whether greedy did the same); it learns where deviating from
greedy pays (bench/train_rl_planner.py, policy gradient on generated problems). Inference is
deterministic (argmax, except that the agent keeps FOLLOW unless its best action's logit beats
FOLLOW's by the calibrated ``follow_margin``) and runs in numpy; the weights and the margin ship
in ``passes/data/rl_planner.pt``. The planner plays the argmax game and a few games that deviate
from it at the decisions the policy ranks next (``search``) and keeps the fastest.

Safety net: the planner always computes greedy's plan (it needs it for FOLLOW anyway) and
returns greedy's plan when the agent's would overflow or simulates slower; ``info["used"]``
says which (the benchmark counts them)."""
from __future__ import annotations

import functools
import math
import os
import time

import numpy as np

from .simulate import PlanningEnv, simulate
from .tiers import GreedyPlanner, Problem, Stay, TierPlan, register_planner

WEIGHTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "rl_planner.pt")
N_STATE, N_ACTFEAT = 24, 10


def _lg(x) -> float:
    """Signed log scale for ratios that span orders of magnitude."""
    return math.copysign(math.log1p(abs(x)), x)


class Game(PlanningEnv):
    """The placement game with ASAP and FOLLOW actions and look-ahead legality (see module doc)."""
    LEADS = (0, 1, 2, 4, 8, 16, 32, 64)

    def __init__(self, problem: Problem, tiers: dict, budget: int, hint: TierPlan | None = None,
                 fail_penalty: float | None = None):
        super().__init__(problem, tiers, budget, fail_penalty)
        L = len(self.LEADS)
        self.ASAP, self.FOLLOW, self.PERSIST = L + 1, L + 2, L + 3
        self.n_actions = L + 4
        n = problem.n_steps
        self.cum_np = np.concatenate([[0.0], np.cumsum(problem.compute_s)])
        self.cum = self.cum_np.tolist()
        self.step_s = max(self.cum[-1] / max(n, 1), 1e-12)
        host_bw = tiers["host"].bandwidth if "host" in tiers else tiers["device"].bandwidth
        disk_bw = tiers["disk"].bandwidth if "disk" in tiers else host_bw
        self.xfer = {}
        for it in problem.items:
            d = it.nbytes / (disk_bw if self.homes.get(it.name) == "disk" else host_bw)
            if self.homes.get(it.name) == "disk" and problem.device == "cuda":
                d += it.nbytes / host_bw
            self.xfer[it.name] = max(d, 1e-12)
        self.hint = _plan_actions(problem, hint) if hint is not None else {}
        self.bw_ratio = _lg(self.cum[-1] / max(sum(self.xfer.values()), 1e-12))   # compute / all transfers
        self.total_cap = float(max(self.cap.max(initial=1), 1))
        self.weight_bytes = sum(it.padded for it in problem.items)

    # ---- state ---------------------------------------------------------------------------------
    def reset(self):
        n = self.problem.n_steps
        self.pos, self.stays, self.open, self.persisted = 0, [], {}, set()
        self.occ = np.zeros(n, dtype=np.int64)
        fneed = np.zeros(n, dtype=np.int64)
        for _, (a, b, k, it) in enumerate(self.segs):
            fneed[a:b + 1] += it.padded
        self.slack = self.cap - fneed
        for it in self.problem.items:
            if it.must_persist:
                self._persist(it)
                self.slack -= it.padded
        self.done, self.last_issue, self.chan = False, 0, 0.0
        self.left_xfer = sum(self.xfer[it.name] for a, b, k, it in self.segs)
        self.persisted_bytes = 0
        self._skip()
        self._cache = None
        return self.state()

    def _compute(self, i: int, j: int) -> float:
        """Compute seconds of steps i..j-1."""
        return self.cum[j] - self.cum[i] if j > i >= 0 else 0.0

    def _starts(self):
        """Each action's first occupied step (None: not allowed) and legality under the look-ahead:
        a stay from s fits if the look-ahead slack over [s, a) holds the item (s > the last step
        in [floor, a) where it does not)."""
        a, b, k, it = self.segs[self.pos]
        size, slack, prev = it.padded, self.slack, self.open.get(it.name)
        floor = prev.evict + 1 if prev is not None else 0
        bad = np.flatnonzero(slack[floor:a] < size)
        last_bad = floor + int(bad[-1]) if len(bad) else floor - 1
        starts = [None] * self.n_actions
        legal = [False] * self.n_actions
        if prev is not None:
            starts[0], legal[0] = floor, floor > last_bad
        for j, L in enumerate(self.LEADS):
            s = max(a - L, floor)
            starts[1 + j], legal[1 + j] = s, s > last_bad
        starts[self.ASAP] = max(min(max(self.last_issue, floor), a), last_bad + 1)
        legal[self.ASAP] = True
        if k == 0 and it.persistent_ok:
            tmp = slack - size
            for x, y in it.segments:
                tmp[x:y + 1] += size
            starts[self.PERSIST], legal[self.PERSIST] = -1, bool(tmp.min() >= 0)
        h = self.hint.get((it.name, k))
        if h is not None:
            kind, s = h
            if kind == "persist" and starts[self.PERSIST] is not None:
                starts[self.FOLLOW], legal[self.FOLLOW] = -1, legal[self.PERSIST]
            elif kind == "keep" and prev is not None:
                starts[self.FOLLOW], legal[self.FOLLOW] = floor, legal[0]
            elif kind == "load":
                s = min(max(s, floor), a)
                starts[self.FOLLOW], legal[self.FOLLOW] = s, s > last_bad
        return starts, np.asarray(legal)

    def observe(self):
        """(state features, per-action features, legal mask) of the current decision."""
        a, b, k, it = self.segs[self.pos]
        n, size, d = self.problem.n_steps, it.padded, self.xfer[it.name]
        starts, legal = self._starts()
        self._cache = (self.pos, starts, legal)
        prev = self.open.get(it.name)
        nxt = it.segments[k + 1][0] if k + 1 < len(it.segments) else None
        cap_a = float(max(self.cap[a], 1))
        left_c = self._compute(a, n)
        hint = self.hint.get((it.name, k), ("none", None))[0]
        st = np.array([
            size / cap_a, _lg(d / self.step_s), _lg(d / max(self.problem.compute_s[a], 1e-12)), (b - a + 1) / n,
            a / n, self.pos / len(self.segs), float(prev is not None), float(self.homes.get(it.name) == "disk"),
            min(len(it.segments) - k - 1, 8) / 4,
            _lg(self._compute(b + 1, nxt) / d) if nxt is not None else -1.0,
            _lg(self._compute(prev.evict + 1, a) / d) if prev is not None else -1.0,
            _lg(self.slack[a:b + 1].min() / size),
            _lg(self.slack.min() / size),
            _lg((self.chan - self.cum[a]) / d),
            _lg(self.left_xfer / max(left_c, 1e-12)),
            self.persisted_bytes / self.total_cap, self.weight_bytes / self.total_cap / 10,
            float(self.problem.device == "cuda"), _lg(self._compute(self.last_issue, a) / d),
            float(hint == "persist"), float(hint == "keep"), float(hint == "load"),
            self.bw_ratio, len(self.segs) / 1000,
        ], dtype=np.float32)
        act = np.zeros((self.n_actions, N_ACTFEAT), dtype=np.float32)
        kinds = self._kinds(it.name, k)
        fs, fk, cum, li, log1p = starts[self.FOLLOW], kinds[self.FOLLOW], self.cum, self.last_issue, math.log1p
        for j, s in enumerate(starts):
            if s is None:
                continue
            row = [0.0] * N_ACTFEAT
            row[kinds[j]] = 1.0
            if s >= 0:
                x = (cum[a] - cum[s]) / d if a > s else 0.0
                row[4] = log1p(x) if x >= 0 else -log1p(-x)
                row[5] = (a - s) / n
                row[6] = (b - s + 1) * size / (n * cap_a)
                row[9] = float(s < li)
            else:
                row[6] = size / cap_a
            row[7] = float(kinds[j] == fk and s == fs)
            row[8] = float(j == self.FOLLOW)
            act[j] = row
        return st, act, legal

    def _kinds(self, name: str, k: int) -> list[int]:
        """Action kinds: 0 keep, 1 fixed lead, 2 ASAP, 3 persist (FOLLOW takes greedy's)."""
        kinds = [0] + [1] * len(self.LEADS) + [2, 1, 3]
        h = self.hint.get((name, k), ("load",))[0]
        kinds[self.FOLLOW] = 0 if h == "keep" else 3 if h == "persist" else 1
        return kinds

    def legal_actions(self) -> list[int]:
        if self.done:
            return []
        return [int(j) for j in np.nonzero(self._starts()[1])[0]]

    def step(self, action: int):
        a, b, k, it = self.segs[self.pos]
        if self._cache is not None and self._cache[0] == self.pos:
            starts, legal = self._cache[1], self._cache[2]
        else:
            starts, legal = self._starts()
        self._cache = None
        if not (0 <= action < self.n_actions) or not legal[action]:
            self.done = True
            return self.state(), -self.fail_penalty, True, {"overflow": True}
        s, size = starts[action], it.padded
        self.left_xfer -= self.xfer[it.name]
        if s == -1:                                    # persist: its future segments leave the look-ahead
            self._persist(it)
            self.slack -= size
            for x, y in it.segments:
                self.slack[x:y + 1] += size
            self.persisted_bytes += size
            self.left_xfer -= sum(self.xfer[it.name] for x, y in it.segments[1:])
            self.open.pop(it.name, None)
        else:
            self.slack[s:a] -= size                    # [a, b] was already reserved by the look-ahead
            self.occ[s:b + 1] += size
            prev = self.open.get(it.name)
            if self._kinds(it.name, k)[action] == 0:     # keep: the stay since its previous segment goes on
                prev.evict = b
            else:
                st = Stay(it.name, s, a, b)
                self.stays.append(st)
                self.open[it.name] = st
                self.last_issue = max(self.last_issue, s)
                self.chan = max(self.chan, self.cum[s]) + self.xfer[it.name]
        return self._advance()

    def state(self) -> dict:
        """The decision's position (legal actions and features: observe(), computed once per decision)."""
        if self.done:
            return {"position": self.problem.n_steps, "done": True}
        a, b, k, it = self.segs[self.pos]
        return {"position": a, "segment": (a, b), "item": it.name, "done": False}


def _plan_actions(problem: Problem, plan: TierPlan) -> dict:
    """(item, segment index) -> ("persist", -1) | ("keep", None) | ("load", start) in ``plan``."""
    by_item: dict[str, list] = {}
    for s in plan.stays:
        by_item.setdefault(s.item, []).append(s)
    out = {}
    for it in problem.items:
        for k, (a, b) in enumerate(it.segments):
            st = next((s for s in by_item.get(it.name, []) if max(s.load, 0) <= a <= s.evict), None)
            if st is None:
                continue
            out[(it.name, k)] = ("persist", -1) if st.load < 0 else ("keep", None) if st.first < a else ("load", st.load)
    return out


# ---- the policy ---------------------------------------------------------------------------------
def make_policy(hidden: int = 64):
    """Shared scorer: logit(s, a) = MLP([state features, action features, one-hot action])."""
    import torch.nn as nn
    n_act = len(Game.LEADS) + 4
    return nn.Sequential(nn.Linear(N_STATE + N_ACTFEAT + n_act, hidden), nn.Tanh(),
                         nn.Linear(hidden, hidden), nn.Tanh(), nn.Linear(hidden, 1))


def policy_inputs(st: np.ndarray, act: np.ndarray) -> np.ndarray:
    n = act.shape[0]
    return np.concatenate([np.broadcast_to(st, (n, st.shape[0])), act, np.eye(n, dtype=np.float32)], axis=1)


class NumpyPolicy:
    """The trained MLP evaluated in numpy (a decision costs microseconds, not a torch call).
    ``follow_margin``: the agent leaves greedy's own choice (FOLLOW) only where its best action's
    logit beats FOLLOW's by at least this much (0: plain argmax); chosen on held-out problems
    after training (bench/train_rl_planner.py --calibrate) and shipped with the weights."""
    follow_margin = 0.0

    def __init__(self, state_dict: dict):
        ws = [(k, v) for k, v in state_dict.items()]
        self.layers = [(np.asarray(ws[i][1], dtype=np.float32), np.asarray(ws[i + 1][1], dtype=np.float32))
                       for i in range(0, len(ws), 2)]

    def logits(self, x: np.ndarray) -> np.ndarray:
        for j, (w, b) in enumerate(self.layers):
            x = x @ w.T + b
            if j < len(self.layers) - 1:
                x = np.tanh(x)
        return x[:, 0]

    def __call__(self, st, act, legal) -> np.ndarray:
        """Masked logits of one decision. The first layer is split by input block (state,
        action features, one-hot action) so the state's share is computed once."""
        w0, b0 = self.layers[0]
        if getattr(self, "_split", (None,))[0] is not w0:
            ns, na = st.shape[0], act.shape[1]
            self._split = (w0, np.ascontiguousarray(w0[:, :ns].T), np.ascontiguousarray(w0[:, ns:ns + na].T),
                           np.ascontiguousarray(w0[:, ns + na:].T) + b0)
        _, ws, wa, we = self._split
        x = np.tanh(st @ ws + act @ wa + we[:act.shape[0]])
        for j, (w, b) in enumerate(self.layers[1:]):
            x = x @ w.T + b
            if j < len(self.layers) - 2:
                x = np.tanh(x)
        return np.where(legal, x[:, 0], -np.inf)

    def choose(self, st, act, legal, follow: int | None = None) -> tuple[int, np.ndarray]:
        """The agent's action (argmax, or FOLLOW within ``follow_margin`` of it) and the logits."""
        z = self(st, act, legal)
        a = int(np.argmax(z))
        if follow is not None and self.follow_margin > 0 and legal[follow] and z[a] - z[follow] < self.follow_margin:
            a = follow
        return a, z


@functools.lru_cache(maxsize=4)
def load_policy(path: str = WEIGHTS) -> NumpyPolicy:
    """The shipped weights (CPU, offline: a local file, no download)."""
    import torch
    blob = torch.load(path, map_location="cpu", weights_only=True)
    if blob.get("n_state") != N_STATE or blob.get("n_actfeat") != N_ACTFEAT:
        raise ValueError(f"{path}: weights were trained for other features; retrain with bench/train_rl_planner.py")
    pol = NumpyPolicy({k: v.numpy() for k, v in blob["state_dict"].items()})
    pol.follow_margin = float(blob.get("follow_margin", 0.0))
    return pol


def play(game: Game, choose, prefix=(), deadline: float | None = None) -> dict:
    """One game: replay the actions ``prefix``, then ``choose(st, act, legal) -> action`` (it may
    return (action, logits)). Returns the plan, its simulated time and the trajectory; past
    ``deadline`` (a time.perf_counter() value) the game is abandoned (``aborted``, no plan)."""
    game.reset()
    traj, info = [], {}
    for a in prefix:
        _, _, _, info = game.step(int(a))
        traj.append((None, None, None, int(a)))
        if info.get("overflow"):
            return {"plan": None, "time_s": float("inf"), "overflow": True, "traj": traj}
    while not game.done:
        if deadline is not None and len(traj) % 32 == 0 and time.perf_counter() > deadline:
            return {"plan": None, "time_s": float("inf"), "overflow": False, "aborted": True, "traj": traj}
        st, act, legal = game.observe()
        a = choose(st, act, legal)
        z = None
        if isinstance(a, tuple):
            a, z = a
        traj.append((st, act, legal, int(a)) if z is None else (st, act, legal, int(a), z))
        _, _, _, info = game.step(int(a))
        if info.get("overflow"):
            return {"plan": None, "time_s": float("inf"), "overflow": True, "traj": traj}
    if "time_s" not in info:                        # nothing (left) to decide
        plan = game.plan()
        info = {"plan": plan, "time_s": simulate(game.problem, plan, game.tiers).time_s}
    return {"plan": info["plan"], "time_s": info["time_s"], "overflow": False, "traj": traj}


def effects(act: np.ndarray, legal) -> list[list[int]]:
    """Legal actions grouped by effect (same kind and start): one game per group is enough."""
    groups: dict = {}
    for a in np.nonzero(legal)[0]:
        groups.setdefault(tuple(np.round(act[a, :6], 6)), []).append(int(a))
    return list(groups.values())


def search(game: Game, policy, n_alt: int, deadline: float | None = None) -> dict:
    """The argmax game, then up to ``n_alt`` games that each take, at one decision, the action the
    policy ranks highest among those it did not choose (most probable first) and play argmax
    after it; the fastest plan wins. Deterministic: a small policy-guided search, as the learned
    policy is what makes a few tries enough (mallocMuZero searches with its policy too).
    ``deadline`` (a time.perf_counter() value) ends the search there, abandoning the game in
    progress (the argmax game always finishes): a guard for slow or loaded machines (``cut``
    says it fired); on a quiet machine the decision budget binds first."""
    def argmax(st, act, legal):
        if hasattr(policy, "choose"):
            return policy.choose(st, act, legal, game.FOLLOW)
        z = policy(st, act, legal)
        return int(np.argmax(z)), z

    best = play(game, argmax)
    best["tries"], first = 1, best["time_s"]
    best["argmax_time_s"] = first
    if best["overflow"] or n_alt <= 0:
        return best
    actions = [x[3] for x in best["traj"]]
    cands = []
    for t, (st, act, legal, a, z) in enumerate(best["traj"]):
        p = np.exp(z - z[a])
        for g in effects(act, legal):
            if a not in g:
                cands.append((-float(p[g].sum()), t, g[0]))
    cands.sort()
    best["cut"] = False
    for _, t, alt in cands[:n_alt]:
        if deadline is not None and time.perf_counter() > deadline:
            best["cut"] = True
            break
        res = play(game, argmax, prefix=actions[:t] + [alt], deadline=deadline)
        if res.get("aborted"):
            best["cut"] = True
            break
        best["tries"] += 1
        if res["time_s"] < best["time_s"]:
            res["tries"], res["cut"] = best["tries"], best["cut"]
            best = res
    best["argmax_time_s"] = first
    return best


@register_planner("rl")
class RLPlanner:
    """The shipped policy's search (argmax game + a few policy-ranked alternatives, at most
    ``search_decisions`` decisions in all, ``max_alt`` games, stopped ``time_budget`` seconds
    after planning began); greedy's plan when the agent's fails or is slower."""
    weights = WEIGHTS
    max_alt = 24
    search_decisions = 4000
    time_budget = 0.5

    def plan(self, problem: Problem, tiers: dict, budget: int) -> TierPlan:
        t0 = time.perf_counter()
        greedy = GreedyPlanner().plan(problem, tiers, budget)       # raises BudgetError when impossible
        g_time = greedy.info.get("sim_s")
        if g_time is None:
            g_time = simulate(problem, greedy, tiers).time_s
        info = {"greedy_sim_s": g_time}
        try:
            policy = load_policy(self.weights)
        except (OSError, ValueError, RuntimeError, KeyError) as e:
            info.update(used="greedy", reason=f"no policy: {e}")
            policy = None
        out = None
        if policy is not None:
            game = Game(problem, tiers, budget, hint=greedy)
            n_alt = min(self.max_alt, self.search_decisions // max(len(game.segs), 1))
            res = search(game, policy, n_alt, deadline=t0 + self.time_budget)
            info["agent_sim_s"] = res["time_s"]
            info["search_cut"] = res.get("cut", False)
            info["follow_margin"] = getattr(policy, "follow_margin", 0.0)
            info["games"], info["argmax_sim_s"] = res["tries"], res["argmax_time_s"]
            info["overflow"] = res["overflow"]
            if not res["overflow"] and res["time_s"] <= g_time:
                out = res["plan"]
                out.info.update(info, used="rl", sim_s=res["time_s"])
            else:
                info.update(used="greedy", reason="overflow" if res["overflow"] else "slower than greedy")
        if out is None:
            out = TierPlan(greedy.homes, greedy.stays, "rl", dict(greedy.info))
            out.info.update(info, sim_s=g_time)
        out.planner = "rl"
        out.info["plan_s"] = time.perf_counter() - t0
        return out
