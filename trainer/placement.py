"""Where a run's actors go: a local Ray or an existing cluster, and two placement groups.

One code path for a laptop and a GPU cluster. `connect` starts a Ray of the run's own
(`cluster.address=null`) or joins an existing cluster (`auto`, `host:port`, `ray://...`).
`reserve` then asks Ray for one placement group holding a bundle per trainer rank
(`trainer.world_size` x {cluster.trainer_cpus CPUs, cluster.trainer_gpus GPUs}) and one
holding a bundle per rollout worker (`rollout.num_workers` x {rollout_cpus, rollout_gpus}),
and waits until Ray has placed them: a cluster without room for the run fails at start,
saying what was asked and what is free, instead of leaving actors pending forever. Each
actor is started into its own bundle (`Placement.trainer_options`, `rollout_options`); a
replacement rollout worker reuses the bundle of the one that died.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


def bundle(cpus: float, gpus: float) -> dict[str, float]:
    """One actor's resources as a placement-group bundle (Ray rejects zero entries)."""
    out = {"CPU": float(cpus)} if cpus else {}
    if gpus:
        out["GPU"] = float(gpus)
    return out


def bundles(cfg: Any) -> tuple[list[dict[str, float]], list[dict[str, float]]]:
    """The trainer ranks' bundles and the rollout workers' bundles, as the profile sizes them."""
    c = cfg.cluster
    return ([bundle(c.trainer_cpus, c.trainer_gpus) for _ in range(cfg.trainer.world_size)],
            [bundle(c.rollout_cpus, c.rollout_gpus) for _ in range(cfg.rollout.num_workers)])


def demand(*groups: list[dict[str, float]]) -> dict[str, float]:
    """What the bundles of `groups` ask for in all, by resource."""
    total: dict[str, float] = {}
    for group in groups:
        for b in group:
            for key, value in b.items():
                total[key] = total.get(key, 0.0) + value
    return total


def shortfall(asked: dict[str, float], have: dict[str, float]) -> dict[str, float]:
    """The resources `asked` exceeds `have` by (empty when it fits, summed over nodes)."""
    return {k: v - have.get(k, 0.0) for k, v in asked.items() if v > have.get(k, 0.0) + 1e-9}


def connect(cfg: Any) -> None:
    """Start the run's own Ray, or connect to the cluster `cluster.address` names."""
    import ray

    if ray.is_initialized():
        return
    common = dict(logging_level="WARNING", log_to_driver=True, configure_logging=True)
    if cfg.cluster.address is None:
        # "local": a fresh Ray for this run even when RAY_ADDRESS is set or `ray start` ran here
        ray.init(address="local", num_cpus=cfg.cluster.num_cpus, include_dashboard=False, **common)
    else:
        try:
            ray.init(address=cfg.cluster.address, **common)
        except (ConnectionError, RuntimeError) as err:
            from trainer.launcher import StartupError

            raise StartupError(
                f"cluster.address={cfg.cluster.address!r}: could not connect to a Ray cluster there ({err}). Is one "
                "running (`ray status` on its head node)? With Ray 2.60 a cluster started by `ray start` requires "
                "token authentication: run with RAY_AUTH_MODE=token and the cluster's token in RAY_AUTH_TOKEN or "
                "~/.ray/auth_token (docs/scaling.md)") from err


@dataclass
class Placement:
    """The two placement groups of a run (None: actors placed by Ray freely, as in tests
    that build actors by hand)."""

    trainer_group: Any
    rollout_group: Any
    trainer_bundle: dict[str, float]
    rollout_bundle: dict[str, float]

    def trainer_options(self, rank: int) -> dict[str, Any]:
        return self._options(self.trainer_group, rank, self.trainer_bundle)

    def rollout_options(self, index: int) -> dict[str, Any]:
        return self._options(self.rollout_group, index, self.rollout_bundle)

    @staticmethod
    def _options(group: Any, index: int, resources: dict[str, float]) -> dict[str, Any]:
        options: dict[str, Any] = {"num_cpus": resources.get("CPU", 0.0), "num_gpus": resources.get("GPU", 0.0)}
        if group is not None:
            from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

            options["scheduling_strategy"] = PlacementGroupSchedulingStrategy(
                placement_group=group, placement_group_bundle_index=index)
        return options


def reserve(cfg: Any) -> Placement:
    """Both placement groups, placed (see the module docstring). Raises
    `trainer.launcher.StartupError` when Ray cannot place them."""
    import ray
    from ray.util.placement_group import placement_group, remove_placement_group

    from trainer.launcher import StartupError

    trainer_bundles, rollout_bundles = bundles(cfg)
    asked = demand(trainer_bundles, rollout_bundles)
    what = (f"trainer.world_size={cfg.trainer.world_size} x {trainer_bundles[0]} (cluster.trainer_cpus/"
            f"trainer_gpus) + rollout.num_workers={cfg.rollout.num_workers} x {rollout_bundles[0]} "
            f"(cluster.rollout_cpus/rollout_gpus) = {asked}")
    def held(resources: dict[str, float]) -> dict[str, float]:  # of the resources the run asks for
        return {k: resources.get(k, 0.0) for k in asked}

    missing = shortfall(asked, ray.cluster_resources())
    if missing and cfg.cluster.address is None:  # a local Ray never grows: say so now
        raise StartupError(f"the run asks Ray for {what}, but this machine's Ray has {held(ray.cluster_resources())} "
                           f"(short of {missing}). Lower those per-actor resources, or the numbers of actors.")
    groups = [placement_group(trainer_bundles, strategy=cfg.cluster.trainer_placement, name=""),
              placement_group(rollout_bundles, strategy=cfg.cluster.rollout_placement, name="")]
    ready, _ = ray.wait([g.ready() for g in groups], num_returns=2, timeout=cfg.cluster.placement_timeout_s)
    if len(ready) < 2:
        for g in groups:
            remove_placement_group(g)
        raise StartupError(
            f"Ray could not place the run's actors within cluster.placement_timeout_s="
            f"{cfg.cluster.placement_timeout_s:g}: it asks for {what} (trainer ranks placed "
            f"{cfg.cluster.trainer_placement}, rollout workers {cfg.cluster.rollout_placement}); the cluster has "
            f"{held(ray.available_resources())} free of {held(ray.cluster_resources())}"
            + (f", short of {missing} in all" if missing else "")
            + ". Lower the per-actor resources, add nodes, or raise cluster.placement_timeout_s "
              "(an autoscaling cluster may need longer to add nodes).")
    return Placement(groups[0], groups[1], trainer_bundles[0], rollout_bundles[0])
