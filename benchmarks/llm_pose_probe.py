"""A probe, not a table: can the trained decoder learn pass-key retrieval past its 1,024-token windows by PoSE?

PoSE (Zhu et al. 2023) trains on short windows whose position ids skip ahead inside the window, so that the model
sees relative distances up to a longer target. This continues training the cached decoder (``benchmarks/llm.py``)
on 1,024-token windows whose positions jump by a random 0..7,168 at one point: 2 pass-key rows a step (key in the
first half, the jump between key and question) and 2 copy rows (a random 48-token segment, text, the segment
again; the jump inside the text). It prints the losses, then dense pass-key accuracy at 1,024 to 8,192 tokens and
the held-out perplexity of the result (nothing is written to the cache; the weights go to /tmp).

    python -m benchmarks.llm_pose_probe [STEPS] [LR]      # e.g. 200 5e-4

Measured 2026-12-07 (docs/llm.md): with this row mix at 5e-4, and in a first try at 3e-4 with 3 pass-key rows
and one copy row of two half-windows a step, the answer and copy losses stayed at guessing (answer ~1.9-2.1, copy
~8.4-8.7, about ln 4,096) for 80-90 steps each, so both runs were stopped: on a 2-core CPU the model does not learn
retrieval across skipped positions in minutes.
"""
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F
import transformers

sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[1]))
from benchmarks import llm  # noqa: E402


def main() -> None:
    STEPS = int(sys.argv[1]) if len(sys.argv) > 1 else 150
    TARGET = 8192
    LR = float(sys.argv[2]) if len(sys.argv) > 2 else 5e-4
    SEQ = 1024
    torch.set_num_threads(2)
    torch.manual_seed(1)
    out = llm.DEFAULT_OUT
    llm.get_decoder(out)  # trains it on first use
    tok = llm.get_tokenizer(out)
    stream = llm._streams(str(out))["train"]
    lm = transformers.LlamaForCausalLM(llm._lm_config())
    lm.load_state_dict(torch.load(out / "decoder.pt", weights_only=True))
    opt = torch.optim.AdamW(lm.parameters(), lr=LR, betas=(0.9, 0.95), weight_decay=0.1)
    rng = np.random.default_rng(1)
    vocab = 4096
    lm.train()
    t0 = time.perf_counter()
    SEG = 48
    for step in range(STEPS):
        n_copy, n_key = 2, 2
        keyed, mask = llm.passkey_batch(tok, stream, n_key, SEQ, rng, depths=rng.uniform(0, 0.5, n_key))
        cmask = np.zeros((n_copy, SEQ), bool)
        crow = []
        for r in range(n_copy):  # a random segment, filler text, the segment again at the end
            seg = rng.integers(1, vocab, SEG)
            s0 = int(rng.integers(0, len(stream) - SEQ))
            fill = stream[s0:s0 + SEQ - 2 * SEG]
            crow.append(np.concatenate([seg, fill, seg]))
            cmask[r, SEQ - SEG:SEQ - 1] = True  # positions whose next token is a copied one
        x = torch.cat([torch.from_numpy(keyed), torch.from_numpy(np.stack(crow))])
        pos = np.tile(np.arange(SEQ), (n_key + n_copy, 1))
        for r in range(n_key + n_copy):
            if r < n_key:
                ans = np.flatnonzero(mask[r])[0]
                lo, hi = int(0.58 * SEQ), ans - 16
            else:
                lo, hi = SEG + 8, SEQ - SEG - 8
            c = int(rng.integers(lo, max(lo + 1, hi)))
            u = int(rng.integers(0, TARGET - SEQ + 1))
            pos[r, c:] += u
        lr = LR * min(1.0, (step + 1) / 20)
        for g in opt.param_groups:
            g["lr"] = lr
        logits = lm(input_ids=x, position_ids=torch.from_numpy(pos), use_cache=False).logits[:, :-1]
        tgt = x[:, 1:]
        tl = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tgt.reshape(-1), reduction="none").view_as(tgt)
        m = torch.from_numpy(mask)[:, :-1]
        cm = torch.from_numpy(cmask)[:, :-1]
        lm_loss = tl[:n_key].mean()
        key_loss = tl[:n_key][m].mean()
        copy_loss = tl[n_key:][cm].mean()
        loss = lm_loss + key_loss + copy_loss
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(lm.parameters(), 1.0)
        opt.step()
        if step % 10 == 0 or step == STEPS - 1:
            print(f"{step} lm {lm_loss.item():.3f} key {key_loss.item():.3f} copy {copy_loss.item():.3f} "
                  f"{time.perf_counter() - t0:.0f}s", flush=True)
    lm.eval()
    torch.save(lm.state_dict(), "/tmp/llm_pose_probe.pt")
    mod = llm._logits_module(lm)
    for n, k in ((1024, 20), (2048, 20), (4096, 10), (8192, 5)):
        t = time.perf_counter()
        print(n, llm.passkey_accuracy(mod, n, n=k, batch=1), f"{time.perf_counter() - t:.0f}s", flush=True)
    w = llm.eval_windows(n=8)
    print(llm.next_token_metrics(mod, w))


if __name__ == "__main__":
    main()
