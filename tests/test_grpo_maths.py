"""The GRPO maths on hand-computed cases (arXiv 2601.08763 Eq. 1-5; TRL 1.16's ddof=1, eps=1e-4)."""

import math

import pytest
import torch

from thinkdiff.grpo.advantages import cluster_sizes, group_advantages, rare_advantages, uniqueness_weights
from thinkdiff.grpo.loss import policy_loss
from thinkdiff.grpo.passk import auc_at_k, pass_at_k, pass_curve


def labels_of(pattern: str) -> list[int]:
    return [ord(ch) - ord("A") for ch in pattern]


def close(a, b, tol=1e-4):
    return torch.allclose(torch.as_tensor(a, dtype=torch.float64), torch.tensor(b, dtype=torch.float64), atol=tol)


def test_uniqueness_weights_for_cluster_sizes():
    sizes = cluster_sizes(labels_of("AAAABCCD"))
    assert sizes == [4, 4, 4, 4, 1, 2, 2, 1]
    assert close(uniqueness_weights(sizes, 0.5), [.5, .5, .5, .5, 1, 1 / math.sqrt(2), 1 / math.sqrt(2), 1])
    assert close(uniqueness_weights(sizes, 1.0), [.25, .25, .25, .25, 1, .5, .5, 1])
    assert close(uniqueness_weights(sizes, 0.0), [1] * 8)
    with pytest.raises(ValueError, match="alpha"):
        uniqueness_weights(sizes, 1.5)


def test_case1_mixed_group():
    r = [1, 1, 1, 0, 1, 0, 0, 1]
    assert close(group_advantages(r), [0.7244, 0.7244, 0.7244, -1.2074, 0.7244, -1.2074, -1.2074, 0.7244])
    a = rare_advantages(r, labels_of("AAAABCCD"), 0.5)
    assert close(a, [0.3622, 0.3622, 0.3622, -0.6037, 0.7244, -0.8537, -0.8537, 0.7244])
    assert float(a.sum()) == pytest.approx(0.2243, abs=1e-4)
    a = rare_advantages(r, labels_of("AAAABCCD"), 1.0)
    assert close(a, [0.1811, 0.1811, 0.1811, -0.3018, 0.7244, -0.6037, -0.6037, 0.7244])
    assert close(group_advantages(r, scale="none"), [0.375] * 3 + [-0.625] + [0.375] + [-0.625] * 2 + [0.375])


def test_case2_uniform_group_is_zero():
    assert close(rare_advantages([1] * 8, labels_of("AABBCDEF"), 1.0), [0.0] * 8)


def test_case3_rare_correct():
    a = rare_advantages([1, 0, 0, 0, 0, 0, 0, 0], labels_of("ABBBBBBB"), 0.5)
    assert close(a, [2.4742] + [-0.1336] * 7)
    a = rare_advantages([1, 0, 0, 0, 0, 0, 0, 0], labels_of("ABBBBBBB"), 1.0)
    assert close(a, [2.4742] + [-0.0505] * 7)


def test_case4_graded_rewards():
    r = [0.9, 0.2, 0.5, 1.0, 0.0, 0.7, 0.3, 0.6]
    assert close(rare_advantages(r, labels_of("AABACCDA"), 0.5),
                 [0.5427, -0.4704, -0.0724, 0.6875, -1.0745, 0.3582, -0.6513, 0.1085])
    assert close(rare_advantages(r, labels_of("AABACCDA"), 1.0),
                 [0.2714, -0.2352, -0.0724, 0.3437, -0.7598, 0.2533, -0.6513, 0.0543])


def test_singleton_beats_crowded_correct_answers_only_with_uniqueness():
    """One correct answer alone in its cluster, four correct answers sharing one cluster, three wrong."""
    r = [1, 1, 1, 1, 1, 0, 0, 0]
    labels = labels_of("BAAAACCD")
    rare = rare_advantages(r, labels, alpha=1.0)
    assert rare[0] > rare[1] and torch.allclose(rare[1:5], rare[1].expand(4))
    assert rare[0] == pytest.approx(group_advantages(r)[0].item())
    plain = rare_advantages(r, labels, alpha=0.0)
    assert torch.allclose(plain[:5], plain[0].expand(5))


def test_clipped_loss_and_kl_on_fixed_logprobs():
    logp = torch.tensor([[-1.0, -2.0, -0.5], [-0.3, -0.2, 0.0]])
    old = torch.tensor([[-1.2, -1.0, -0.5], [-0.3, -0.5, 0.0]])
    ref = torch.tensor([[-1.1, -2.0, -0.7], [-0.4, -0.2, 0.0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    adv = torch.tensor([1.0, -2.0])
    ratio = torch.exp(logp - old)
    # Hand computation, token by token.
    pg = torch.empty(2, 3)
    for i in range(2):
        for t in range(3):
            r, a = ratio[i, t].item(), adv[i].item()
            pg[i, t] = -min(r * a, min(max(r, 0.8), 1.2) * a)
    d = ref - logp
    kl = torch.exp(d) - d - 1
    per = pg + 0.1 * kl
    m = mask.float()
    loss, stats = policy_loss(logp, old, ref, adv, mask, beta=0.1, eps_low=0.2, aggregation="grpo")
    assert loss.item() == pytest.approx((((per * m).sum(1) / m.sum(1)).mean()).item(), abs=1e-6)
    loss, _ = policy_loss(logp, old, ref, adv, mask, beta=0.1, aggregation="token")
    assert loss.item() == pytest.approx(((per * m).sum() / m.sum()).item(), abs=1e-6)
    loss, _ = policy_loss(logp, old, ref, adv, mask, beta=0.1, aggregation="dr_grpo", max_completion_length=4)
    assert loss.item() == pytest.approx(((per * m).sum() / 8).item(), abs=1e-6)
    assert stats["kl"] == pytest.approx(((kl * m).sum() / m.sum()).item(), abs=1e-6)
    assert (kl >= 0).all()
    # Clip-higher: a ratio of 1.25 with a positive advantage is clipped at 1.2 but not at 1.28.
    l1, _ = policy_loss(torch.tensor([[math.log(1.25)]]), torch.zeros(1, 1), None, torch.ones(1), torch.ones(1, 1))
    l2, _ = policy_loss(torch.tensor([[math.log(1.25)]]), torch.zeros(1, 1), None, torch.ones(1), torch.ones(1, 1),
                        eps_high=0.28)
    assert l1.item() == pytest.approx(-1.2) and l2.item() == pytest.approx(-1.25)


def test_pass_at_k_closed_form():
    assert pass_at_k(10, 3, 1) == pytest.approx(0.3)
    assert pass_at_k(10, 3, 5) == pytest.approx(1 - 21 / 252)
    assert pass_at_k(10, 3, 8) == 1.0
    assert pass_at_k(256, 4, 64) == pytest.approx(1 - math.comb(252, 64) / math.comb(256, 64))
    assert pass_at_k(256, 4, 64) == pytest.approx(0.6861, abs=1e-4)
    curve = pass_curve([[0, 1, 1, 0, 1], [1, 1, 0, 1, 1]])
    assert curve == pytest.approx([0.70, 0.95, 1.0, 1.0, 1.0])
    assert auc_at_k(curve, 2) == pytest.approx(0.825) and auc_at_k(curve, 5) == pytest.approx(0.95)
    assert auc_at_k(curve, 1) == pytest.approx(0.70)
    with pytest.raises(ValueError):
        pass_at_k(3, 4, 1)


class KeyedCoinEngine:
    """A stand-in policy that samples as our engines do: request i of a call draws from the generator keyed by
    (seed, first_index + i); it answers "1" (right) or "0" with probability 1/2."""

    def generate(self, requests, layers, sampling, progress=False):
        from types import SimpleNamespace

        from thinkdiff.rng import generator

        return [SimpleNamespace(text=str(torch.randint(2, (1,), generator=generator(sampling.seed,
                                                                                    sampling.first_index + i)).item()))
                for i in range(len(requests))]


def test_passk_samples_are_independent_across_problems():
    """Sample j of problem i is keyed (seed, i * n + j): the same prompt asked as two problems gets other samples,
    each problem's samples are those of a direct call at its first index, and pass@1 estimates the coin's 1/2."""
    from thinkdiff.grpo.evaluate import evaluate_passk
    from thinkdiff.grpo.problems import Problem
    from thinkdiff.grpo.verifiers import get_verifier
    from thinkdiff.vlm import SamplingConfig, VLMRequest

    engine, n, verify = KeyedCoinEngine(), 16, get_verifier("numeric")
    sampling = SamplingConfig(do_sample=True, seed=3)
    problems = [Problem(f"p{i}", "toss", "1") for i in range(40)]
    correct = evaluate_passk(engine, problems, n, sampling, keep_correct=True, progress=False)["correct"]
    for i in (0, 1, 39):
        direct = engine.generate([VLMRequest("toss")] * n, [], SamplingConfig(do_sample=True, seed=3,
                                                                             first_index=i * n))
        assert correct[i] == [verify(o.text, "1") > 0 for o in direct]
    assert correct[0] != correct[1]
    assert sum(map(sum, correct)) / (40 * n) == pytest.approx(0.5, abs=0.06)
