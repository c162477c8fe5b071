"""Tree-branching rollouts (`rollout.workflow=tree`): one prompt, a tree of token segments.

A group of n leaves is grown in rounds on the same `EpisodeContext` as any workflow:

1. `n_roots` = max(1, n − round(n · mix)) independent samples (LATR's tree/flat mix; `mix`
   may follow a schedule over policy versions), each a child of a token-less root node;
2. each round looks at the segments the previous round generated and picks branch
   points, after the fact, from each position's top-2 sampled distribution (the engine
   hands back top-k logprobs with the finished segment; this build cannot stream them
   mid-request): LATR's rule (p₂ > τ_abs and p₁ − p₂ < τ_rel, the alternative being the
   top-2 token that was not sampled) or the `top_n` most surprising sampled tokens
   (TreeRL, the alternative being the likeliest token not sampled);
3. a child is the parent's response up to the branch point plus the alternative token,
   *forced*, with its true sampling logprob under the distribution that produced the
   parent's token there (and that distribution's version), so importance weights stay
   exact; it then decodes on, reusing the prefix cache for everything before;
4. after `lookahead` tokens a child whose continuation is too close to its sibling's
   (normalised edit distance below `prune_distance`) is pruned (counted, not trained).

Every leaf is a `Trajectory` whose response is its root-to-leaf path; `node_ids` says
which node (segment) each token belongs to, `Group.tree_parents` links the nodes. The
trainer gives each segment its node's advantage (`algorithm.tree_advantage`) and trains a
shared prefix once (algorithms/tree.py). An interrupted tree (APRIL) comes back partial
and resumes its unfinished leaves; it does not branch further (the resumed tokens' top-2
are not kept).
"""

from __future__ import annotations

import asyncio
import math
from dataclasses import dataclass

from buffer.prompts import PromptItem
from buffer.types import FinishReason, Group, Trajectory
from rollout.workflow import EpisodeContext, GroupWorkflow

ROOT = 0  # the token-less root node: the prompt


@dataclass
class Branch:
    leaf: Trajectory
    position: int  # index in the leaf's response where the child takes another token
    token: int
    logprob: float  # the token's sampling logprob under the distribution at `position`
    score: float  # higher branches first


def edit_distance(a: list[int], b: list[int]) -> float:
    """Levenshtein distance normalised by the longer length (0 = identical)."""
    if not a and not b:
        return 0.0
    row = list(range(len(b) + 1))
    for i, x in enumerate(a, 1):
        prev, row[0] = row[0], i
        for j, y in enumerate(b, 1):
            prev, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, prev + (x != y))
    return row[-1] / max(len(a), len(b))


class TreeWorkflow(GroupWorkflow):
    def __init__(self, rule: str = "latr", tau_abs: float = 0.15, tau_rel: float = 0.25, top_n: int = 2,
                 rounds: int = 2, lookahead: int = 8, prune_distance: float = 0.4, mix: float = 1.0,
                 mix_schedule: list | None = None) -> None:
        if rule not in ("latr", "surprisal"):
            raise ValueError(f"tree workflow: rule must be 'latr' or 'surprisal', got {rule!r}")
        if not (0 <= tau_abs <= 1 and 0 <= tau_rel <= 1 and 0 <= mix <= 1 and 0 <= prune_distance <= 1):
            raise ValueError("tree workflow: tau_abs, tau_rel, mix and prune_distance must be in [0, 1]")
        if rounds < 1 or top_n < 1 or lookahead < 0:
            raise ValueError("tree workflow: rounds >= 1, top_n >= 1 and lookahead >= 0")
        self.rule, self.tau_abs, self.tau_rel, self.top_n = rule, tau_abs, tau_rel, top_n
        self.rounds, self.lookahead, self.prune_distance = rounds, lookahead, prune_distance
        self.mix = mix
        # [[version, mix], ...] ascending: from that policy version on, that mix (LATR: 1 -> 0.25)
        self.mix_schedule = sorted((int(v), float(m)) for v, m in (mix_schedule or []))

    def mix_at(self, version: int) -> float:
        mix = self.mix
        for start, value in self.mix_schedule:
            if version >= start:
                mix = value
        return mix

    # -- choosing branch points ------------------------------------------------------------
    def candidates(self, leaf: Trajectory, start: int, tops: list) -> list[Branch]:
        """Branch points among the leaf's positions start.. whose top-2 the engine gave."""
        found = []
        for offset, top in enumerate(tops):
            p = start + offset
            if p >= leaf.num_response_tokens or len(top) < 2:
                continue
            sampled = leaf.response_ids[p]
            others = [(t, lp) for t, lp in top if t != sampled]
            if not others:
                continue
            alt, alt_lp = others[0]
            if self.rule == "latr":
                p1, p2 = math.exp(top[0][1]), math.exp(top[1][1])
                if p2 > self.tau_abs and p1 - p2 < self.tau_rel:
                    found.append(Branch(leaf, p, alt, alt_lp, p2))
            else:
                found.append(Branch(leaf, p, alt, alt_lp, -leaf.behaviour_logprobs[p]))
        if self.rule == "surprisal":
            found = sorted(found, key=lambda b: -b.score)[: self.top_n]
        return found

    # -- the episode -------------------------------------------------------------------------
    async def arun_episode(self, ctx: EpisodeContext, item: PromptItem) -> Group | None:
        if ctx.partial is not None:  # resumed after an interrupt: finish the leaves it has
            group = ctx.partial
            group.trajectories = list(await asyncio.gather(*(ctx.agenerate(t) for t in group.trajectories)))
            return await self._done(ctx, group)
        group = ctx.new_group(PromptItem(item.prompt_id, item.prompt, item.row, 0, item.group_id,
                                         item.start_version, item.context))
        template = ctx.new_group(PromptItem(item.prompt_id, item.prompt, item.row, 1)).trajectories[0]
        budget = item.n_samples
        n_roots = max(1, budget - round(budget * self.mix_at(item.start_version)))
        parents = {ROOT: -1}
        stats = {"branch_points": 0.0, "pruned": 0.0, "decoded_tokens": 0.0}
        roots = [self._fresh(template) for _ in range(n_roots)]
        frontier = []
        for root in roots:
            parents[len(parents)] = ROOT
            root.node_ids = []
        tops = [[] for _ in roots]
        await asyncio.gather(*(ctx.agenerate(r, top_logprobs=2, tops=t) for r, t in zip(roots, tops)))
        for i, root in enumerate(roots):
            root.node_ids = [i + 1] * root.num_response_tokens
            stats["decoded_tokens"] += root.num_response_tokens
            frontier.append((root, 0, tops[i]))
        leaves = list(roots)
        for _ in range(self.rounds):
            room = budget - len(leaves)
            if room <= 0 or not frontier or any(t.finish_reason is FinishReason.ABORTED for t in leaves):
                break
            unique = {(b.leaf.node_ids[b.position], b.position, b.token): b  # a shared node's
                      for leaf, start, t in frontier for b in self.candidates(leaf, start, t)}  # point, once
            chosen = sorted(unique.values(), key=lambda b: -b.score)[:room]
            children: list[Trajectory] = []
            for b in chosen:  # each split relabels every path through it, this round's children too
                children.append(self._branch(b, leaves + children, parents))
            stats["branch_points"] += len(children)
            grown = await asyncio.gather(*(self._grow(ctx, child, b, stats) for child, b in zip(children, chosen)))
            frontier = [(child, b.position + 1, t) for (child, t), b in zip(grown, chosen) if child is not None]
            leaves += [child for child, _ in grown if child is not None]
        group.trajectories = leaves
        group.tree_parents = parents
        group.stats = {"tree/leaves": float(len(leaves)), "tree/branch_points": stats["branch_points"],
                       "tree/pruned": stats["pruned"],
                       "tree/decoded_tokens_per_leaf": stats["decoded_tokens"] / len(leaves),
                       "tree/prefix_cache_hit_rate": ctx.cached_prompt_tokens / max(ctx.prompt_tokens, 1)}
        return await self._done(ctx, group)

    async def _done(self, ctx: EpisodeContext, group: Group) -> Group | None:
        if not group.is_finished:
            return group  # interrupted: handed back partial
        if not await ctx.ascore(group):
            return None
        texts = [ctx.tokenizer.decode(t.response_ids, skip_special_tokens=True) for t in group.trajectories]
        group.stats["tree/distinct_answers"] = float(len({text.rsplit("#", 1)[-1].strip() for text in texts}))
        return group

    @staticmethod
    def _fresh(template: Trajectory) -> Trajectory:
        return Trajectory(template.prompt_id, template.group_id, list(template.prompt_ids),
                          context_ids=list(template.context_ids))

    def _branch(self, b: Branch, leaves: list[Trajectory], parents: dict[int, int]) -> Trajectory:
        """Split the branched node at the branch point and start the child: the prefix,
        then the alternative token forced with its sampling logprob and version."""
        leaf, p = b.leaf, b.position
        node = leaf.node_ids[p]
        if p > 0 and leaf.node_ids[p - 1] == node:  # inside the node: split it at p
            tail = len(parents)
            parents[tail] = node  # the node's tokens from p on become a new node, below it
            for other in leaves:  # every leaf sharing the node shares those positions
                other.node_ids = [tail if (q >= p and n == node) else n for q, n in enumerate(other.node_ids)]
            for child_node, parent in list(parents.items()):
                if parent == node and child_node != tail and self._branches_after(child_node, p, leaves):
                    parents[child_node] = tail
            branch_parent = node
        else:  # at the node's first token: the child is the node's sibling
            branch_parent = parents[node]
        branch_node = len(parents)
        parents[branch_node] = branch_parent
        child = self._fresh(leaf)
        child.response_ids = leaf.response_ids[:p] + [b.token]
        child.behaviour_logprobs = leaf.behaviour_logprobs[:p] + [b.logprob]
        child.versions = leaf.versions[:p] + [leaf.versions[p]]  # the distribution that was sampled there
        child.loss_mask = leaf.loss_mask[:p] + [1]
        child.node_ids = leaf.node_ids[:p] + [branch_node]
        return child

    @staticmethod
    def _branches_after(node: int, p: int, leaves: list[Trajectory]) -> bool:
        """Whether the node's tokens start after position p (it hung off the split node's end)."""
        for leaf in leaves:
            if node in leaf.node_ids:
                return leaf.node_ids.index(node) > p
        return True

    async def _grow(self, ctx: EpisodeContext, child: Trajectory, b: Branch,
                    stats: dict) -> tuple[Trajectory | None, list]:
        tops: list = []
        start = child.num_response_tokens
        node = child.node_ids[-1]
        if self.lookahead:
            await ctx.agenerate(child, min(start + self.lookahead, ctx.max_tokens), top_logprobs=2, tops=tops)
            ours = child.response_ids[start:]
            theirs = b.leaf.response_ids[start:start + len(ours)]
            if ours and edit_distance(ours, theirs) < self.prune_distance:
                stats["pruned"] += 1
                stats["decoded_tokens"] += len(ours)
                return None, []
            if child.finish_reason is FinishReason.LENGTH:
                child.finish_reason = None  # the lookahead's budget, not the response's
        await ctx.agenerate(child, top_logprobs=2, tops=tops)
        stats["decoded_tokens"] += child.num_response_tokens - start
        child.node_ids = child.node_ids + [node] * (child.num_response_tokens - len(child.node_ids))
        return child, tops

