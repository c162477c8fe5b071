import pytest

from buffer.types import FinishReason, Group, Trajectory


def make_traj(tokens=(5, 6, 1), version=0, reward=1.0):
    t = Trajectory(prompt_id="p", group_id="g", prompt_ids=[3, 4])
    t.append_tokens(list(tokens), [-0.1] * len(tokens), version)
    t.reward = reward
    t.finish_reason = FinishReason.STOP
    return t


def test_append_tokens_records_one_logprob_version_and_mask_per_token():
    t = Trajectory(prompt_id="p", group_id="g", prompt_ids=[3])
    t.append_tokens([7, 8], [-0.5, -0.25], version=2)
    t.append_tokens([9], [-1.0], version=3)
    assert t.response_ids == [7, 8, 9]
    assert t.behaviour_logprobs == [-0.5, -0.25, -1.0]
    assert t.versions == [2, 2, 3]
    assert t.loss_mask == [1, 1, 1]
    assert (t.oldest_version, t.newest_version) == (2, 3)


def test_misaligned_per_token_lists_are_refused():
    with pytest.raises(ValueError, match="per-token lists"):
        Trajectory(prompt_id="p", group_id="g", prompt_ids=[1], response_ids=[1, 2], behaviour_logprobs=[0.0],
                   versions=[0, 0], loss_mask=[1, 1])
    t = Trajectory(prompt_id="p", group_id="g", prompt_ids=[1])
    with pytest.raises(ValueError, match="2 tokens but 1 logprobs"):
        t.append_tokens([1, 2], [0.0], 0)


def test_group_properties_span_its_trajectories():
    g = Group(group_id="g", prompt_id="p", prompt_text="1+1=", row={"answer": "2"})
    assert not g.is_finished and g.oldest_version is None
    g.trajectories = [make_traj(version=3), make_traj(tokens=(1,), version=1, reward=0.0)]
    assert g.is_finished
    assert g.oldest_version == 1
    assert g.num_tokens == 4
    assert g.rewards == [1.0, 0.0]
    g.trajectories[0].finish_reason = FinishReason.ABORTED
    assert not g.is_finished
