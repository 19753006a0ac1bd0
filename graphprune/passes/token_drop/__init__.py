"""Pass ``token_drop``: insert TokenSelect / TokenMerge nodes into a transformer graph, training-free.

Pattern: the :class:`AttentionBlock` records of ``analysis.attention`` (never raw attention ops). For each
selected block the reducing node goes on the residual stream:
  * ``placement: mlp`` (default, EViT/ToMe): on the output of the block's residual ``Add`` (x + attn), before
    the MLP's LayerNorm. For a post-norm (BERT-style) block, whose stream goes through LayerNorm first, on the
    LayerNorm output (token selection commutes with a per-token LayerNorm).
  * ``placement: block``: at the block's end, i.e. on the next block's residual input.
Every later user of that value reads the reduced tokens; token-count constants downstream are retargeted
(:mod:`.rewire`).

Cases:
  1. ``cls_attention``: TokenSelect scored by the head-mean CLS row (or ``query`` rows) of the block's probs;
     fused ``Attention`` ops get those rows recomputed from Q, K (the block stays fused).
  2. ``attention_graph``: TokenSelect scored by ``iterations`` power iterations over the head-mean attention.
  3. ``diversity``: DiversitySelect (DivPrune greedy max-min cosine diversity of the stream tokens).
  4. ``tome``: TokenMerge (r per layer, keys head-mean as metric) and proportional attention (log size added to
     the logits, or to the ``Attention`` op's mask) in all following blocks.
Preserved: prefix tokens (``protect``, detected when omitted) stay first, so CLS pooling is unchanged; mean
pooling averages the kept tokens; position embeddings are already added upstream; batch stays dynamic.

Later blocks' per-token attention masks (additive or boolean, rank 4) are gathered with the kept indices (ToMe:
each merged token's representative position).

Refusals (recorded in ``skipped`` with the reason; the model is left unchanged there): no attention blocks;
no residual ``Add`` found; a later mask that is not rank 4, or ``fuse_rest`` with a later mask (the fused token
has no mask entry); fused attention without [B,H,N,D] q/k or with grouped KV heads; token counts that collide
with a model dimension in shape constants, or size constants (Split, Tile, ...) holding the token count.
Each is a :class:`Skip` for that block; one met while planning (a FLOPs budget needs every block's stream
point) skips the model. A skip is never an error: the run succeeds and reports it.
Config errors (:class:`ConfigError`, naming the key): ``layers`` beyond the model's blocks, a ``schedule`` list
of the wrong length, an unreachable FLOPs budget; value ranges are checked by the pydantic config.

The package, one idea per module:
  * :mod:`.config`: the YAML keys and the record of one reduction;
  * :mod:`.plan`: which blocks and how many tokens (default layers, pyramid stages, a FLOPs budget);
  * :mod:`.drop`: the pass, running the plan block by block;
  * :mod:`.select` / :mod:`.merge`: the node each method inserts (selection scored by :mod:`.scores`; ToMe's
    merge and proportional attention);
  * :mod:`.env`: where a run stands and the steps every reduction shares; :mod:`.rewire` (static N) and
    :mod:`.dynamic` (symbolic N): the graph rewired behind the reduced stream;
  * :mod:`.restore`: the tokens put back (the levels each reduction leaves are dataclasses);
  * :mod:`.image`: ``scope: image`` for vision-language models.
"""

from graphprune.passes.token_drop.config import TokenDropConfig, TokenReduction
from graphprune.passes.token_drop.drop import TokenDropPass
from graphprune.passes.token_drop.select import score_rows

__all__ = ["TokenDropConfig", "TokenDropPass", "TokenReduction", "score_rows"]
