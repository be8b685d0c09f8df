"""Train the RL tier planner's policy on generated problems (CPU, minutes) and write the weights
kiln ships (passes/data/rl_planner.pt):

    PYTHONPATH=$PWD python bench/train_rl_planner.py [--minutes 3] [--workers 1] [--out PATH] [--calibrate]

1. Imitation: the policy learns to pick FOLLOW (greedy's own choice) from games played by greedy,
   so the argmax agent starts out as good as greedy.
2. Policy gradient with rollout advantages (the "vine" estimator of TRPO): play the argmax game
   of the current policy on a batch of problems; at a few of its states score every legal
   action a by finishing the game with the current argmax policy, Q(s, a) = -simulated time /
   greedy's time (-fail_penalty when a game overflows); ascend
   sum_a pi(a|s) (Q(s, a) - V(s)) grad log pi(a|s), V(s) = sum_a pi(a|s) Q(s, a), plus an
   entropy bonus. Reward relative to greedy puts every problem on one scale.
Keeps the weights that do best on a held-out set (mean agent time / greedy time, argmax play).
3. Calibration (--calibrate, or alone with --calibrate-only on the weights at --out): the
   planner's own search (RLPlanner: argmax game + policy-ranked alternatives) on another held-out
   set (CAL_SEEDS, ~24-200 steps, plus a few 500/1,000-step problems) for a few values of the
   policy's ``follow_margin`` (leave greedy's choice only when the best logit beats FOLLOW's by
   that much); the one with the lowest mean agent time / greedy time ships with the weights.
   The safety net plays no part: this is the agent's own plan.
"""
from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

TRAIN_SEEDS = range(100_000, 100_600)
EVAL_SEEDS = range(200_000, 200_060)
CAL_SEEDS = range(200_000, 200_150)
CAL_LARGE = [(210_000 + i, ("stack", "chain", "branch")[i % 3], (500, 1000)[i % 2]) for i in range(12)]
MARGINS = (0.0, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5)

_games: dict = {}


def _case(seed: int):
    from kiln.passes.tiers_gen import case
    rng = np.random.default_rng(seed + 7)
    return case(seed, n=int(rng.integers(24, 200)))


def _game(seed: int):
    """(game, greedy time) of one training problem, cached per worker."""
    if seed not in _games:
        from kiln.passes.tiers import GreedyPlanner
        from kiln.passes.tiers_rl import Game
        c = _case(seed)
        g = GreedyPlanner().plan(c.problem, c.tiers, c.budget)
        _games[seed] = (Game(c.problem, c.tiers, c.budget, hint=g), g.info["sim_s"])
    return _games[seed]


def _policy(layers):
    from kiln.passes.tiers_rl import NumpyPolicy
    p = NumpyPolicy({})
    p.layers = layers
    return p


def _finish(game, prefix, choose) -> float:
    """Replay ``prefix`` then play ``choose``; the simulated time (inf on overflow)."""
    game.reset()
    info = {}
    for a in prefix:
        _, _, _, info = game.step(a)
        if info.get("overflow"):
            return float("inf")
    while not game.done:
        st, act, legal = game.observe()
        _, _, _, info = game.step(int(choose(st, act, legal)))
        if info.get("overflow"):
            return float("inf")
    if "time_s" not in info:
        from kiln.passes.simulate import simulate
        return simulate(game.problem, game.plan(), game.tiers).time_s
    return info["time_s"]


def follow_samples(seed: int):
    """Imitation data: states of greedy's own game with target FOLLOW (ASAP where FOLLOW is illegal)."""
    from kiln.passes.tiers_rl import play
    game, _ = _game(seed)
    res = play(game, lambda st, act, legal: game.FOLLOW if legal[game.FOLLOW] else game.ASAP)
    return [(st, act, legal, a) for st, act, legal, a in res["traj"]]


def _effects(act, legal):
    """Legal actions grouped by effect (kind one-hot and start features equal)."""
    groups: dict = {}
    for a in np.nonzero(legal)[0]:
        groups.setdefault(tuple(np.round(act[a, :6], 6)), []).append(int(a))
    return list(groups.values())


def vine_samples(args):
    """Rollout advantages at ``n_states`` states of the argmax game of ``layers``."""
    seed, layers, n_states, n_alt, rseed, explore = args
    from kiln.passes.tiers_rl import play
    rng = np.random.default_rng(rseed)
    game, g_time = _game(seed)
    pol = _policy(layers)

    def argmax(st, act, legal):
        return int(np.argmax(pol(st, act, legal)))

    def behave(st, act, legal):                # mostly argmax, sometimes a random legal action
        if rng.random() < explore:
            return int(rng.choice(np.nonzero(legal)[0]))
        return argmax(st, act, legal)

    base = play(game, behave)
    traj = base["traj"]
    actions = [a for *_, a in traj]
    out = []
    if not traj:
        return out, 1.0
    # half the states where PERSIST is legal (the decisions that matter most), half anywhere
    pers = [i for i, x in enumerate(traj) if x[2][game.PERSIST]]
    ts = list(rng.choice(pers, size=min(n_states // 2, len(pers)), replace=False)) if pers else []
    rest = [i for i in range(len(traj)) if i not in ts]
    ts += list(rng.choice(rest, size=min(n_states - len(ts), len(rest)), replace=False))
    for t in ts:
        st, act, legal, _ = traj[t]
        mine = argmax(st, act, legal)
        groups = _effects(act, legal)            # actions with the same effect share one rollout
        others = [g for g in groups if mine not in g]
        pick = [next(g for g in groups if mine in g)]
        pick += [others[i] for i in rng.choice(len(others), size=min(n_alt, len(others)), replace=False)]
        q = np.full(len(legal), np.nan)
        for g in pick:
            v = _finish(game, actions[:t] + [int(g[0])], argmax)
            q[g] = -v / g_time if np.isfinite(v) else -10.0
        out.append((st, act, legal, q, mine))
    return out, base["time_s"] / g_time


def evaluate(args):
    seed, layers = args
    from kiln.passes.tiers_rl import play
    game, g_time = _game(seed)
    pol = _policy(layers)
    res = play(game, lambda st, act, legal: int(np.argmax(pol(st, act, legal))))
    return res["time_s"] / g_time


def _layers(model):
    ws = [p.detach().numpy().copy() for p in model.parameters()]
    return [(ws[i], ws[i + 1]) for i in range(0, len(ws), 2)]


def _batch(samples):
    import torch
    from kiln.passes.tiers_rl import policy_inputs
    x = torch.from_numpy(np.stack([policy_inputs(st, act) for st, act, *_ in samples]))
    mask = torch.from_numpy(np.stack([s[2] for s in samples]))
    return x, mask


def _logp(model, x, mask):
    import torch
    z = model(x).squeeze(-1).masked_fill(~mask, -1e9)
    return torch.log_softmax(z, -1)


def calibrate(path: str) -> None:
    """Pick the shipped follow_margin (module doc, step 3) and record the calibration in ``path``."""
    import torch
    from kiln.passes.tiers import GreedyPlanner
    from kiln.passes.tiers_gen import case
    from kiln.passes.tiers_rl import Game, NumpyPolicy, RLPlanner, search
    t0 = time.perf_counter()
    blob = torch.load(path, map_location="cpu", weights_only=True)
    pol = NumpyPolicy({k: v.numpy() for k, v in blob["state_dict"].items()})
    probs = [_case(s) for s in CAL_SEEDS] + [case(s, family=f, n=n) for s, f, n in CAL_LARGE]
    games = []
    for c in probs:
        g = GreedyPlanner().plan(c.problem, c.tiers, c.budget)
        game = Game(c.problem, c.tiers, c.budget, hint=g)
        n_alt = min(RLPlanner.max_alt, RLPlanner.search_decisions // max(len(game.segs), 1))
        games.append((game, g.info["sim_s"], n_alt))
    table = {}
    for m in MARGINS:
        pol.follow_margin = m
        rs = [search(game, pol, n_alt) for game, _, n_alt in games]
        agent = np.array([r["time_s"] / gt for r, (_, gt, _) in zip(rs, games)])
        first = np.array([r["argmax_time_s"] / gt for r, (_, gt, _) in zip(rs, games)])
        table[m] = {"search": float(np.mean(agent)), "argmax": float(np.mean(first)),
                    "search_better": int(np.sum(agent < 1 - 1e-9)), "search_worse": int(np.sum(agent > 1 + 1e-9)),
                    "argmax_better": int(np.sum(first < 1 - 1e-9)), "argmax_worse": int(np.sum(first > 1 + 1e-9))}
        print(f"[calibrate {time.perf_counter() - t0:5.0f}s] follow_margin {m}: " + ", ".join(
            f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in table[m].items()), flush=True)
    # the agent's own plan on average; the argmax game breaks near-ties
    best = min(MARGINS, key=lambda m: (round(table[m]["search"], 4), table[m]["argmax"]))
    blob.update(follow_margin=float(best), calibration={str(k): v for k, v in table.items()},
                calibration_problems=len(probs))
    torch.save(blob, path)
    print(f"follow_margin {best} written to {path}")


def main():
    import torch
    from kiln.passes.tiers_rl import N_ACTFEAT, N_STATE, WEIGHTS, make_policy
    ap = argparse.ArgumentParser()
    ap.add_argument("--minutes", type=float, default=3.0)
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--batch", type=int, default=16, help="problems per policy-gradient step")
    ap.add_argument("--states", type=int, default=4, help="states scored per problem")
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--alts", type=int, default=3, help="alternative actions scored per state")
    ap.add_argument("--explore", type=float, default=0.05, help="random actions in the sampled game")
    ap.add_argument("--method", choices=("pg", "npg", "api", "sil"), default="sil")
    ap.add_argument("--sil", type=float, default=1.0, help="sil: weight of the self-imitation term")
    ap.add_argument("--smooth", type=float, default=0.05, help="label smoothing of the imitation phase")
    ap.add_argument("--margin", type=float, default=1e-3, help="api: gain over the argmax that counts")
    ap.add_argument("--entropy", type=float, default=0.01)
    ap.add_argument("--eval-every", type=int, default=5)
    ap.add_argument("--out", default=WEIGHTS)
    ap.add_argument("--calibrate", action="store_true", help="calibrate follow_margin after training")
    ap.add_argument("--calibrate-only", action="store_true", help="only calibrate the weights at --out")
    args = ap.parse_args()
    if args.calibrate_only:
        torch.set_num_threads(1)
        calibrate(args.out)
        return
    torch.manual_seed(args.seed)
    torch.set_num_threads(1)
    rng = np.random.default_rng(args.seed)
    t0 = time.perf_counter()
    pool = mp.get_context("fork").Pool(args.workers)
    model = make_policy()
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)

    # 1. imitation of greedy (FOLLOW)
    data = [s for lst in pool.map(follow_samples, list(TRAIN_SEEDS)[:200]) for s in lst]
    x, mask = _batch(data)
    y = torch.tensor([a for *_, a in data])
    for ep in range(300):
        idx = torch.randint(0, len(y), (512,))
        lp, m = _logp(model, x[idx], mask[idx]), mask[idx]
        smooth = (lp.masked_fill(~m, 0.0).sum(-1) / m.sum(-1)).mean()      # label smoothing: keep exploring
        loss = (1 - args.smooth) * torch.nn.functional.nll_loss(lp, y[idx]) - args.smooth * smooth
        opt.zero_grad()
        loss.backward()
        opt.step()
    ev = pool.map(evaluate, [(s, _layers(model)) for s in EVAL_SEEDS])
    best = (float(np.mean(ev)) + float(np.mean(np.minimum(ev, 1.0))), {k: v.clone() for k, v in model.state_dict().items()})
    print(f"[{time.perf_counter() - t0:6.0f}s] imitation: {len(y)} decisions, loss {loss.item():.4f}, "
          f"held-out agent/greedy {np.mean(ev):.4f}", flush=True)

    # 2. policy gradient with rollout advantages
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    it = 0
    while time.perf_counter() - t0 < args.minutes * 60:
        it += 1
        seeds = rng.choice(list(TRAIN_SEEDS), size=args.batch, replace=False)
        layers = _layers(model)
        res = pool.map(vine_samples, [(int(s), layers, args.states, args.alts, int(rng.integers(1 << 30)),
                                       args.explore) for s in seeds])
        samples = [s for lst, _ in res for s in lst]
        if not samples:
            continue
        x, mask = _batch(samples)
        q = torch.from_numpy(np.stack([qq for *_, qq, _ in samples])).float()
        known = ~torch.isnan(q) & mask
        q = q.nan_to_num(0.0)
        mine = torch.tensor([m for *_, m in samples])
        logp = _logp(model, x, mask)
        p = logp.exp()
        ent = -(p * logp.masked_fill(~mask, 0.0)).sum(-1).mean()
        base = q.gather(1, mine[:, None])                      # Q of the current argmax action
        adv = (q - base).masked_fill(~known, 0.0)
        if args.method in ("pg", "sil"):
            # all-action policy gradient over the scored actions, baseline V = sum pi Q (renormalised)
            pk = p.masked_fill(~known, 0.0)
            v = (pk * q).sum(-1, keepdim=True) / pk.sum(-1, keepdim=True).clamp_min(1e-9)
            a = (q - v).masked_fill(~known, 0.0).detach()
            scale = a.abs().sum(-1).mean().clamp_min(1e-6)
            loss = -(pk.detach() * a * logp).sum(-1).mean() / scale - args.entropy * ent
            if args.method == "sil":
                # self-imitation (Oh et al. 2018): also imitate a scored action that beat the argmax,
                # in proportion to its gain: the rare better actions of a near-deterministic policy
                best_adv, best_a = adv.max(-1)
                w = (best_adv / args.margin).clamp(0, 10.0) * (best_adv > args.margin)
                loss = loss + args.sil * (w * torch.nn.functional.nll_loss(logp, best_a, reduction="none")).mean()
        elif args.method == "npg":
            # every scored action's logit moves by its advantage over the current argmax (the natural
            # gradient direction of a softmax policy; plain pg weights it by pi(a), which barely moves
            # the rare better actions of a near-deterministic policy)
            scale = adv.abs().sum(-1).mean().clamp_min(1e-6)
            loss = -(adv.detach() * logp).sum(-1).mean() / scale - args.entropy * ent
        else:
            # policy improvement: move towards the best scored action where it beats the argmax by a margin
            best_adv, best_a = adv.max(-1)
            target = torch.where(best_adv > args.margin, best_a, mine)
            w = 1.0 + (best_adv.clamp_min(0) / args.margin).clamp_max(10.0)
            loss = (w * torch.nn.functional.nll_loss(logp, target, reduction="none")).mean() - args.entropy * ent
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if it % args.eval_every == 0:
            evs = np.array(pool.map(evaluate, [(s, _layers(model)) for s in EVAL_SEEDS]))
            ev, ev_net = float(np.mean(evs)), float(np.mean(np.minimum(evs, 1.0)))
            tr = float(np.mean([r for _, r in res]))
            better = float((adv.max(-1).values > args.margin).float().mean())
            print(f"[{time.perf_counter() - t0:6.0f}s] it {it}: train agent/greedy {tr:.4f}, held-out {ev:.4f} (with the net {ev_net:.4f}), "
                  f"entropy {ent.item():.3f}, improvable states {better:.2f}", flush=True)
            if ev + ev_net < best[0]:                  # model selection: raw agent and with the net
                best = (ev + ev_net, {k: v.clone() for k, v in model.state_dict().items()})
    pool.close()
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    torch.save({"state_dict": best[1], "n_state": N_STATE, "n_actfeat": N_ACTFEAT,
                "heldout_score": best[0], "iterations": it, "minutes": (time.perf_counter() - t0) / 60,
                "train_seeds": [TRAIN_SEEDS.start, TRAIN_SEEDS.stop]}, args.out)
    print(f"wrote {args.out} (held-out score: agent/greedy + with the net = {best[0]:.4f})")
    if args.calibrate:
        calibrate(args.out)


if __name__ == "__main__":
    main()
