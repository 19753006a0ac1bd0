"""Embedding distillation after apply_plan (``benchmarks.bench_finetune.distill``) on a tiny random BertModel: the
pruned encoder's cosine to the original's embeddings goes up, measured independently of ``distill``'s own figures."""

from __future__ import annotations

import copy

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import graphprune.torch as gt  # noqa: E402
from benchmarks.bench_finetune import distill  # noqa: E402


class _Encoder(torch.nn.Module):
    """BertModel → masked mean pooling → L2 normalisation (as benchmarks.minilm.SentenceEncoder)."""

    def __init__(self, bert):
        super().__init__()
        self.bert = bert

    def forward(self, input_ids, attention_mask):
        h = self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        m = attention_mask.unsqueeze(-1).to(h.dtype)
        return torch.nn.functional.normalize((h * m).sum(1) / m.sum(1).clamp(min=1e-9), dim=-1)


def _batches(n, size, seq, gen):
    out = []
    for _ in range(n):
        ids = torch.randint(0, 200, (size, seq), generator=gen)
        mask = torch.ones(size, seq, dtype=torch.int64)
        mask[: size // 2, seq - 3:] = 0
        out.append((ids, mask))
    return out


def _cos(student, teacher, batches):
    with torch.no_grad():
        return float(torch.cat([torch.nn.functional.cosine_similarity(student(*b), teacher(*b), dim=-1)
                                for b in batches]).mean())


@pytest.mark.slow  # a torch export of its own (the fast tier leaves those to CI)
def test_distillation_raises_cosine_to_teacher(tmp_path):
    """optimize (channel_prune 50%) → apply_plan → distill: cosine to the teacher measured here, before and after."""
    torch.manual_seed(0)
    cfg = transformers.BertConfig(attn_implementation="eager", hidden_size=64, num_hidden_layers=2,
                                  num_attention_heads=4, intermediate_size=128, vocab_size=200,
                                  max_position_embeddings=32, initializer_range=0.2)
    teacher = _Encoder(transformers.BertModel(cfg)).eval()
    gen = torch.Generator().manual_seed(1)
    train, held = _batches(6, 8, 12, gen), _batches(2, 8, 12, gen)
    res = gt.optimize(teacher, train[0], [{"name": "channel_prune", "ratio": 0.5}], out=tmp_path / "p.onnx",
                      force=True)
    student = gt.apply_plan(teacher, res.plan, train[0])
    assert gt.count_parameters(student) < 0.8 * gt.count_parameters(teacher)
    before_state = copy.deepcopy(teacher.state_dict())
    train_before, held_before = _cos(student, teacher, train), _cos(student, teacher, held)
    stats = distill(student, teacher, train, epochs=4, lr=3e-3)
    train_after, held_after = _cos(student, teacher, train), _cos(student, teacher, held)
    assert stats["cosine_before"] == pytest.approx(train_before, abs=1e-5)
    assert stats["cosine_after"] == pytest.approx(train_after, abs=1e-5)
    assert stats["steps"] == 4 * len(train)
    # weights of std 0.2 (not BERT's 0.02) so that pruning half the channels really moves the embeddings
    assert train_before < 0.6
    assert train_after > train_before + 0.3
    assert held_after > held_before + 0.2  # not only the token sequences it was trained on
    for k, v in teacher.state_dict().items():  # the teacher is left alone
        torch.testing.assert_close(v, before_state[k])
