"""Vision-language models: which attention blocks see the image, which are the language decoder's, the projector
between them, and where (and at which positions) the image features enter the decoder's sequence. Changes nothing.

A VLM export (LLaVA-style: vision tower → patch features → projector → merged into the text embeddings → decoder)
is recognised from data flow alone, whatever the spelling:

  * the **text input** is an integer graph input that indexes an embedding table (``input_ids``), the **image
    input** the float graph input the vision blocks are computed from (``pixel_values [B, 3, H, W]``, or Qwen2-VL's
    flattened patches ``[P, C·T·p·p]``);
  * **vision blocks** are attention blocks computed from the image alone, **decoder blocks** those computed from both
    (after the merge);
  * the **merge** is the first node that combines a value computed from the image alone (the **features**, the
    projector's output) with the text embeddings along the token axis:

    - a token-axis ``Concat``: the image span is static, ``[start, stop)`` (the sizes of the operands before the
      features, and the features' token count);
    - a ``Where`` (or ``ScatterND``) whose condition is ``input_ids == image_token_id``: the positions are read from
      ``input_ids`` at run time (transformers' ``masked_scatter``, or its static-shape spelling with ``CumSum`` and a
      gather of the features); the span is ``None`` and ``image_token_id`` the compared constant;

  * the **projector** is every node between the end of the last vision block's residual stream and the features
    (a token slice that drops [CLS], the projector's MatMuls and activations).

:func:`find_vision_language` returns ``None`` for a model that is not a VLM (no image and text input, or no block on
either side), and a :class:`VisionLanguage` otherwise.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import onnx_ir as ir

from graphprune._ir import const_value, dim
from graphprune.analysis.attention import AttentionBlock, NoMatch, find_attention_blocks
from graphprune.analysis.streams import stream_end
from graphprune.analysis.tokens import is_shape

_FLOATS = (ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.BFLOAT16, ir.DataType.DOUBLE)
_LINEAR = ("MatMul", "Gemm")


@dataclasses.dataclass
class VisionLanguage:
    """What :func:`find_vision_language` found (``describe()`` is ``inspect --json``'s ``vision_language``)."""

    image_input: ir.Value
    text_input: ir.Value
    vision_blocks: list[AttentionBlock]
    decoder_blocks: list[AttentionBlock]
    features: ir.Value  # the projector's output [B, P, C] as the merge reads it
    merge: ir.Node
    projector: list[ir.Node]
    image_span: tuple[int, int] | None = None  # [start, stop) on the decoder's token axis, when static
    image_token_id: int | None = None  # when the positions are read from input_ids
    image_tokens: int | None = None  # P, when static
    vision_prefix: int = 0  # [CLS] / register tokens of the vision tower (dropped before the projector)

    def describe(self) -> dict[str, Any]:
        return {
            "image_input": self.image_input.name,
            "text_input": self.text_input.name,
            "vision_blocks": [b.index for b in self.vision_blocks],
            "decoder_blocks": [b.index for b in self.decoder_blocks],
            "vision_prefix_tokens": self.vision_prefix,
            "projector": {"nodes": [n.name for n in self.projector],
                          "linear_layers": sum(n.op_type in _LINEAR and n.domain == "" for n in self.projector),
                          "output": self.features.name},
            "merge": {"node": self.merge.name, "op": self.merge.op_type},
            "image_tokens": self.image_tokens,
            "image_span": list(self.image_span) if self.image_span is not None else None,
            "image_token_id": self.image_token_id,
        }


def _data_reach(graph: ir.Graph, start: ir.Value) -> set[int]:
    """ids of the values computed from ``start``'s data (a ``Shape`` of a value carries its shape, not its data)."""
    reached = {id(start)}
    for node in graph:  # graph order is topological
        if is_shape(node) or node.op_type in ("Size",) and node.domain == "":
            continue
        if any(v is not None and id(v) in reached for v in node.inputs):
            reached.update(id(o) for o in node.outputs)
    return reached


def _embedding_input(graph: ir.Graph, inputs: list[ir.Value]) -> ir.Value | None:
    for v in inputs:
        if v.dtype is None or not v.dtype.is_integer():
            continue
        stack = [v]
        for _ in range(6):
            nxt = []
            for x in stack:
                for user, idx in x.uses():
                    if user.op_type == "Gather" and idx == 1 and const_value(user.inputs[0]) is not None and \
                            user.inputs[0].dtype in _FLOATS:
                        return v
                    if user.op_type in ("Cast", "Unsqueeze", "Reshape", "Flatten", "Squeeze", "Clip", "Max", "Where"):
                        nxt.extend(user.outputs)
            stack = nxt
    return None


def _block_value(b: AttentionBlock) -> ir.Value | None:
    return b.q if b.q is not None else (b.attn_input if b.attn_input is not None else b.output)


def _compared_constant(v: ir.Value | None, text: ir.Value, depth: int = 8) -> int | None:
    """The constant ``c`` when ``v`` is (a cast / unsqueeze / expand of) ``text == c``."""
    for _ in range(depth):
        p = v.producer() if v is not None else None
        if p is None:
            return None
        if p.op_type == "Equal":
            a, b = p.inputs
            for x, y in ((a, b), (b, a)):
                c = const_value(y)
                if c is not None and np.asarray(c).size == 1 and _derives(x, text):
                    return int(np.asarray(c).reshape(()))
            return None
        if p.op_type not in ("Cast", "Unsqueeze", "Expand", "Reshape", "Not", "Identity", "Tile"):
            return None
        v = p.inputs[0]
    return None


def _derives(v: ir.Value | None, src: ir.Value, depth: int = 6) -> bool:
    for _ in range(depth):
        if v is src:
            return True
        p = v.producer() if v is not None else None
        if p is None or p.op_type not in ("Cast", "Unsqueeze", "Reshape", "Identity", "Squeeze"):
            return False
        v = p.inputs[0]
    return v is src


def _ancestors(v: ir.Value, stop: set[int]) -> list[ir.Node]:
    seen: dict[int, ir.Node] = {}
    stack = [v]
    while stack:
        x = stack.pop()
        p = x.producer()
        if p is None or id(p) in seen or id(x) in stop:
            continue
        seen[id(p)] = p
        stack.extend(i for i in p.inputs if i is not None and const_value(i) is None)
    return list(seen.values())


def find_vision_language(model: ir.Model, blocks: list[AttentionBlock] | None = None) -> VisionLanguage | None:
    """The model's vision-language structure, or ``None`` when it is not a VLM (see the module doc)."""
    graph = model.graph
    inputs = [v for v in graph.inputs if v.name not in graph.initializers]
    text = _embedding_input(graph, inputs)
    images = [v for v in inputs if v.dtype in _FLOATS and v.shape is not None and len(v.shape) >= 2]
    if text is None or not images:
        return None
    blocks = find_attention_blocks(model) if blocks is None else blocks
    from_text = _data_reach(graph, text)
    for image in images:  # pixel_values [B, 3, H, W], or flattened patches [P, C·T·p·p] (Qwen2-VL)
        from_img = _data_reach(graph, image)
        vision, decoder = [], []
        for b in blocks:
            v = _block_value(b)
            if v is None or id(v) not in from_img:
                continue
            (decoder if id(v) in from_text else vision).append(b)
        if vision and decoder:
            break
    else:
        return None
    merge, feats = _merge(graph, from_img, from_text)
    if merge is None:
        return None
    span, token_id = None, None
    if merge.op_type == "Concat":
        axis = merge.attributes.get_int("axis", 0)
        rank = len(merge.outputs[0].shape) if merge.outputs[0].shape is not None else 3
        axis = axis + rank if axis < 0 else axis
        k = next(i for i, x in enumerate(merge.inputs) if x is feats)
        sizes = [dim(x, axis) for x in merge.inputs[:k + 1]]
        if all(isinstance(s, int) for s in sizes):
            span = (sum(sizes[:-1]), sum(sizes))
    else:
        token_id = _compared_constant(merge.inputs[0], text)
    last = vision[-1]
    end = stream_end(last)
    stop = {id(end)} if not isinstance(end, NoMatch) else {id(last.output)}
    projector = [n for n in graph if id(n) in {id(p) for p in _ancestors(feats, stop)}]
    tokens = dim(feats, 1)
    return VisionLanguage(image, text, vision, decoder, feats, merge, projector, span, token_id,
                          tokens if isinstance(tokens, int) else None, max(b.prefix_tokens for b in vision))


def _merge(graph: ir.Graph, from_img: set[int], from_text: set[int]) -> tuple[ir.Node | None, ir.Value | None]:
    """The first node mixing image-only data with text data along the tokens, and its image-only operand."""
    for node in graph:
        ins = [v for v in node.inputs if v is not None]
        img_only = [v for v in ins if id(v) in from_img and id(v) not in from_text]
        if not img_only or not any(id(v) in from_text for v in ins):
            continue
        if node.op_type == "Concat" and len(img_only) == 1:
            return node, img_only[0]
        if node.op_type in ("Gather", "GatherElements", "GatherND") and node.inputs[0] is img_only[0]:
            # the static spelling of masked_scatter: features gathered at CumSum(mask) - 1, then a Where
            out = node.outputs[0]
            for user, _ in _follow(out):
                if user.op_type in ("Where", "ScatterND"):
                    return user, img_only[0]
            return None, None
        if node.op_type in ("Where", "ScatterND", "ScatterElements"):
            return node, img_only[0]
        return None, None  # mixed by something else: not a merge we can describe
    return None, None


def _follow(v: ir.Value, depth: int = 4):
    stack = [(v, 0)]
    while stack:
        x, d = stack.pop()
        for user, idx in x.uses():
            yield user, idx
            if d < depth and user.op_type in ("Reshape", "Cast", "Expand", "Unsqueeze", "Squeeze", "Identity"):
                stack.append((user.outputs[0], d + 1))


__all__ = ["VisionLanguage", "find_vision_language"]
