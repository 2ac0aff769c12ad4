"""ExpertAdamW: torch's AdamW on the experts used, nothing at all on the others."""
import torch

from tuneqdm_core import ExpertAdamW


def test_matches_torch_adamw_when_every_expert_is_used():
    torch.manual_seed(0)
    p1 = torch.nn.Parameter(torch.randn(3, 5))
    p2 = torch.nn.Parameter(p1.detach().clone())
    ours = ExpertAdamW([p1], lr=1e-2, weight_decay=1e-2)
    ref = torch.optim.AdamW([p2], lr=1e-2, weight_decay=1e-2)
    for step in range(5):
        g = torch.randn(3, 5)
        p1.grad, p2.grad = g.clone(), g.clone()
        ours.step(torch.tensor([0, 1, 2]))
        ref.step()
    torch.testing.assert_close(p1, p2, rtol=1e-5, atol=1e-6)


def test_unused_experts_do_not_move_and_used_ones_keep_their_own_step_count():
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(4, 6))
    single = torch.nn.Parameter(p.detach()[2:3].clone())
    opt = ExpertAdamW([p], lr=1e-2, weight_decay=0.1)
    ref = torch.optim.AdamW([single], lr=1e-2, weight_decay=0.1)
    before = p.detach().clone()
    for step in range(4):
        g = torch.randn(4, 6)
        p.grad = g
        used = [0, 2] if step == 0 else [2]
        opt.step(torch.tensor(used))
        single.grad = g[2:3].clone()
        ref.step()
    assert torch.equal(p[1], before[1]) and torch.equal(p[3], before[3])  # never drawn: bit-identical
    assert not torch.equal(p[0], before[0])
    torch.testing.assert_close(p[2:3], single, rtol=1e-5, atol=1e-6)  # row 2's own AdamW trajectory
    assert opt.state[p]["step"].tolist() == [1.0, 0.0, 4.0, 0.0]
