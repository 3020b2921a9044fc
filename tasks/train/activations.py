"""Activation memory of one training micro-batch, per rank, from the model config alone (no tensors).

What autograd keeps between a micro-batch's forward and its backward, plus what the backward needs on top,
counted tensor by tensor from the model code (``kimivl_model/``): every term below names the tensor a node
saves. ``tests/unit/test_activations.py`` checks the per-layer counts byte for byte against what autograd
really saves (``torch.autograd.graph.saved_tensors_hooks``) on the tiny and small presets, and the whole
estimate against the peak that ``torch.distributed._tools.mem_tracker.MemTracker`` measures for a real
forward + backward on CPU, with and without gradient checkpointing.

Per LM token, one decoder layer saves (``a`` = bytes of a saved matmul operand: 4 in fp32, 2 under bf16
autocast, where every linear saves its own bf16 copy of its input; norms, router, residual stream and
softmax statistics stay fp32):

- RMSNorm (``_RMSNormFn``): x_hat (4 H) and 1/rms (4), twice (input and post-attention norms);
- MLA: the normed input of q_proj / kv_a_proj (4 H: one fp32 tensor, or two bf16 copies), with q-LoRA the
  q_a norm (4 q_lora + 4) and q_b_proj's input (a q_lora); kv_a norm (4 kv_lora + 4); kv_b_proj's input
  (a kv_lora); attention's q, k, v and output, v and the output zero-padded to the q/k head dim
  (4 a heads (qk_nope + qk_rope)) and its log-sum-exp (4 heads); o_proj's input (a heads v_head);
- MoE: the post-norm output the router reads in fp32 (4 H; under bf16 + two bf16 copies for the shared
  expert's gate/up projections, 4 H); router scores (4 E), top-k ids (8 k), top-k weights and their sum
  (4 k + 4); dispatch permutation (8 k); routed SwiGLU input rows (a k H) and gate/up/silu/product
  (4 a k I_moe); combined outputs in the residual dtype (4 k H) with the combine's indices (CPU
  ``embedding_bag``: 24 + 4 k; CUDA gather: 8 k + 4 k); shared experts' gate/up/silu/product
  (4 a I_shared); the sequence-wise aux loss (4 E + 12) while it is on;
- dense FFN layers instead: the normed input (4 H) and gate/up/silu/product (4 a I).

Once per micro-batch: token ids (8), RoPE cos/sin (4 qk_rope), the final norm (4 H + 4) and the fused head
+ CE (``linear_cross_entropy_sum``): the labelled rows' ids and precomputed input gradients (8 + 4 H per
labelled token, all tokens counted), the head's fp32 weight gradient (4 V H, when the head trains) and, while
the forward runs, one chunk of fp32 logits and their softmax (``loss_chunk_size`` x V x (4 + a)).

A MoonViT block saves per patch: LayerNorm inputs and statistics (2 x (4 H + 8)), wqkv's input and output
(4 a H), the rotated q and k (2 a H), attention output and log-sum-exp (a H + 4 heads), wo's and fc0's
inputs (2 a H) and the MLP hidden before and after GELU (2 a I). Outside the blocks: the patch pixels
(4 x 3 x 14 x 14, the patch embedding's input), the 2D RoPE tables (4 head_dim), the final LayerNorm
(4 H + 8) and the projector (its
LayerNorm 4 H_vit + 8 per patch, the two linears' inputs and GELU's input 3 a 4 H_vit per merged token).

Phase shapes (worst case, since a phase must fit its largest micro-batch):
- LM/SFT phases: ``seq_len`` tokens per micro-batch, and, when the ViT or projector trains, as many image
  patches as ``seq_len`` image tokens can hold (merge_rows x merge_cols x seq_len: an all-image sequence);
  a frozen component saves nothing (nothing behind it needs a gradient);
- CoCa (the ViT stage): ``captions_per_batch`` images at the phase's largest patch budget per image; the
  LM never runs. The CoCa text decoder's activations are NOT counted (say so where shown).

Sequence parallelism (``sequence_parallel: N``, ``kimivl_model/sequence_parallel.py``): a rank holds
ceil(seq_len / N) tokens outside attention, and inside it the whole sequence for H / N heads, the same bytes
as its slice with every head; so every per-token term above counts the slice. Its images: as many patches as
its slice's image tokens hold, plus the two images its slice's ends may cut (encoded whole on this rank, at
most ``max_patches_per_image`` each), never more than the whole sequence's.

Gradient checkpointing (``model.gradient_checkpointing``) keeps only each layer's input (the fp32 residual,
4 H per token / patch) and recomputes one layer at a time in the backward. On top of what is kept, the
plan adds the larger of (a) the backward's working set, ``workspace``: the gradients flowing between nodes
and a layer's local buffers, plus under checkpointing the recomputed layer, and (b) the forward's
``transient`` loss chunk. (a) is calibrated, not derived: MemTracker's CPU peak of a second micro-batch
(gradients of the first one accumulated, as in training; fp32, 2,048 tokens) minus weights, gradients and
the kept tensors was 1.38x (tiny) and 0.61x (small) the largest layer's saved bytes without checkpointing,
1.34x and 1.27x with it; the plan takes 1.5x, so it errs on the safe side (the test bounds by how much). Not counted: DeepSpeed's gradient buckets, allocator
fragmentation, the CUDA context.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from kimivl_model.config import LMConfig, MoonViTConfig, ProjectorConfig

FP32, BF16, INT64 = 4, 2, 8


def lm_layer_bytes(cfg: LMConfig, moe: bool, act: int, device: str = "cuda", aux: bool = True) -> int:
    """Bytes one decoder layer saves per token (module docstring); ``act`` = 4 (fp32) or 2 (bf16)."""
    h, heads = cfg.hidden_size, cfg.num_heads
    qk = cfg.qk_nope_head_dim + cfg.qk_rope_head_dim
    n = 2 * (FP32 * h + FP32)  # input + post-attention RMSNorm
    n += FP32 * h  # q_proj / kv_a_proj input
    if cfg.q_lora_rank is not None:
        n += FP32 * cfg.q_lora_rank + FP32 + act * cfg.q_lora_rank
    n += FP32 * cfg.kv_lora_rank + FP32 + act * cfg.kv_lora_rank  # kv_a norm, kv_b_proj input
    n += 4 * act * heads * qk + FP32 * heads  # attention q, k, v, out (padded to qk) + lse
    n += act * heads * cfg.v_head_dim  # o_proj input
    if not moe:
        return n + FP32 * h + 4 * act * cfg.intermediate_size
    k, e, inter = cfg.num_experts_per_tok, cfg.num_routed_experts, cfg.moe_intermediate_size
    n += FP32 * h + (
        FP32 * h if act == BF16 and cfg.num_shared_experts else 0
    )  # router in fp32, shared casts
    n += FP32 * e + INT64 * k + FP32 * k + FP32  # scores, top-k ids, weights, their sum
    n += INT64 * k + act * k * h + 4 * act * k * inter  # dispatch, expert input rows, gate/up/silu/product
    n += FP32 * k * h + (24 + FP32 * k if device == "cpu" else INT64 * k + FP32 * k)  # combine
    n += 4 * act * cfg.num_shared_experts * inter
    if aux and cfg.aux_loss_alpha > 0:
        n += FP32 * e + 12
    return n


def vit_block_bytes(cfg: MoonViTConfig, act: int) -> int:
    """Bytes one MoonViT block saves per patch (module docstring)."""
    h = cfg.hidden_size
    return (
        2 * (FP32 * h + 8)
        + 4 * act * h
        + 2 * act * h
        + act * h
        + FP32 * cfg.num_heads
        + 2 * act * h
        + 2 * act * cfg.intermediate_size
    )


@dataclass(frozen=True)
class ActivationPlan:
    """Bytes per rank for one micro-batch (``total`` = what the memory plan adds to the model states)."""

    tokens: int  # LM tokens per micro-batch (0: the LM does not run)
    patches: int  # ViT patches per micro-batch (0: nothing saved in the vision path)
    checkpointing: bool
    lm: int  # saved by the LM's layers (checkpointing: their inputs)
    vit: int  # saved by the ViT blocks, patch embedding and projector
    head: int  # embeddings, final norm, fused head + CE (incl. the head's weight gradient)
    workspace: int  # the backward's working set: 1.5x the largest layer's saved bytes (calibrated)
    transient: int  # the forward's peak on top of what it keeps: one loss chunk's logits

    @property
    def total(self) -> int:
        """What is kept, plus the larger of the backward's workspace and the forward's transient."""
        return self.lm + self.vit + self.head + max(self.workspace, self.transient)

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "total": self.total}


def micro_batch_activations(
    lm: LMConfig | None,
    vit: MoonViTConfig | None,
    projector: ProjectorConfig | None,
    *,
    tokens: int,
    patches: int,
    lm_trains: bool,
    head_trains: bool,
    vit_trains: bool,
    projector_trains: bool,
    checkpointing: bool,
    act: int,
    device: str,
    loss_chunk: int = 1024,
) -> ActivationPlan:
    """Activation bytes of one micro-batch of ``tokens`` LM tokens and ``patches`` ViT patches."""
    layers: list[int] = []
    lm_saved = head = transient = 0
    if lm is not None and tokens:
        # anything trainable at or before the LM makes its layers save (their inputs need gradients too)
        per_layer = [
            lm_layer_bytes(lm, lm.is_moe_layer(i), act, device) * tokens for i in range(lm.num_layers)
        ]
        layers += per_layer
        lm_saved = FP32 * lm.hidden_size * tokens * lm.num_layers if checkpointing else sum(per_layer)
        head = (INT64 + FP32 * lm.qk_rope_head_dim + FP32 * lm.hidden_size + FP32) * tokens
        head += (INT64 + FP32 * lm.hidden_size) * tokens  # labelled rows (worst case: all) + their grads
        head += FP32 * lm.vocab_size * lm.hidden_size if head_trains else 0
        # fp32 logits of one chunk (under bf16 autocast also the GEMM's bf16 output they are cast from)
        transient = min(loss_chunk, tokens) * lm.vocab_size * (FP32 + (act if act == BF16 else 0))
        if not lm_trains:  # frozen LM: still saves when something before it trains (its input's grad)
            lm_saved = lm_saved if (vit_trains or projector_trains) else 0
            layers = layers if (vit_trains or projector_trains) else []
    vit_saved = 0
    if vit is not None and patches and vit_trains:
        block = vit_block_bytes(vit, act) * patches
        layers += [block] * vit.num_layers
        vit_saved = (
            FP32 * vit.hidden_size * patches * vit.num_layers if checkpointing else block * vit.num_layers
        )
        vit_saved += FP32 * vit.in_channels * vit.patch_size**2 * patches  # patch pixels
        vit_saved += (FP32 * vit.hidden_size + 8 + FP32 * vit.head_dim) * patches  # final LN, 2D RoPE cos/sin
    if projector is not None and patches and (vit_trains or projector_trains):
        merge = projector.merge_kernel[0] * projector.merge_kernel[1]
        vit_saved += (FP32 * projector.vit_hidden_size + 8) * patches
        vit_saved += 3 * act * projector.merged_hidden_size * (patches // merge)
    largest = max(layers, default=0)
    return ActivationPlan(
        tokens=tokens,
        patches=patches,
        checkpointing=checkpointing,
        lm=lm_saved,
        vit=vit_saved,
        head=head,
        workspace=largest * 3 // 2,
        transient=transient,
    )


def phase_activations(
    arch: Any, phase: Any, checkpointing: bool, precision: str, device: str
) -> ActivationPlan:
    """The worst-case micro-batch of ``phase`` (module docstring) for the VLM config ``arch``."""
    act = BF16 if precision == "bf16" else FP32
    trains = set(phase.trainable)
    merge = arch.projector.merge_kernel[0] * arch.projector.merge_kernel[1]
    if phase.objective == "coca":
        budgets = [r.max_patches for r in phase.progressive_resolution] or [arch.vit.max_patches_per_image]
        patches = phase.captions_per_batch * min(max(budgets), arch.vit.max_patches_per_image)
        return micro_batch_activations(
            None,
            arch.vit,
            None,
            tokens=0,
            patches=patches,
            lm_trains=False,
            head_trains=False,
            vit_trains="vit" in trains,
            projector_trains=False,
            checkpointing=checkpointing,
            act=act,
            device=device,
        )
    vision = bool(trains & {"vit", "projector"})
    sp = getattr(phase, "sequence_parallel", 1)
    tokens = -(-phase.seq_len // sp)  # this rank's slice (the longest: the first slices are one longer)
    patches = merge * tokens
    if sp > 1:  # images cut by the slice's two ends are encoded whole on this rank
        patches = min(patches + 2 * arch.vit.max_patches_per_image, merge * phase.seq_len)
    return micro_batch_activations(
        arch.lm,
        arch.vit,
        arch.projector,
        tokens=tokens,
        patches=patches if vision else 0,
        lm_trains="lm" in trains,
        head_trains="lm" in trains,
        vit_trains="vit" in trains,
        projector_trains="projector" in trains,
        checkpointing=checkpointing,
        act=act,
        device=device,
    )
