def generate_all(graph, target, cache_dir):
    return {}
