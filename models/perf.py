"""Switches of the inference optimisations, so each one can be turned off and checked against the plain path.

Every optimisation here keeps greedy outputs identical (``tests/models/test_referrer_perf.py`` compares
token ids with each switch off and on); some are bit-exact by construction, the others only reorder
floating-point work (a different matmul shape or split), which the tests show does not change the ids.
They exist because on the pipeline's real workload (one video, many objects, a caption plus questions
per object) most of the work is either repeated across requests or spent in per-step Python overhead:

* ``native_decode``: our own greedy loop (``models.decoding``) instead of ``GenerationMixin.generate``.
  It skips the generation framework's per-step machinery (logits processors, stopping criteria,
  cache bookkeeping), computes the vocabulary projection only for the last position, and drops rows that
  reached eos from the batch instead of decoding padding for them.
* ``share_prefix``: prefill the longest common prefix of the sequences (same ids *and* same embedding
  rows) once and reuse its KV cache. For full PixelRefer every request of a video starts with the same
  chat header and the same frame tokens (thousands at real resolutions), so the video is prefilled once
  per call instead of once per request. For Lite the shared part is only the chat header plus the instruction before the
  first ``<region>`` (object tokens differ per object, and a question about an object shares nothing with
  its caption beyond the header), so it saves little there; it is still exact, so it stays on.
  Needs ``native_decode``.
* ``share_object_tokens``: requests about the same object(s) get their object tokens (crop features,
  k-means, OCI, ``feat_linear``) computed once. k-means draws are per sequence from
  ``manual_seed(kmeans_seed)`` in mask order, so the tokens of a mask depend only on the masks before
  it in its sequence; a (sequence-prefix of masks) seen before is reused together with the generator
  state it left behind, which gives the same draws as recomputing.
* ``fast_kmeans``: on CPU, k-means distances in cache-sized blocks and cluster means from one sort
  instead of 32 boolean gathers (both bit-identical; see ``modeling_pixelrefer.squared_distances`` and
  ``cluster_means``). With the released 1152-wide tower, upstream's expression spends ~0.1-0.2 s per
  mask on a 2-core CPU (an (N, 32, 1152) temporary three times per iteration); a 20-frame object has 20
  masks. The loop runs on one intra-op thread (``modeling_pixelrefer.single_thread``): its ops are too
  small for a parallel region to pay (measured: one 1152-wide mask of ~350 cells, 72 ms on one thread,
  312 ms on two, on the shared 2-vCPU machine).

Not offered: ``torch.compile`` / static shapes. Measured on this project's 2-vCPU machine with the tiny
decoder (``torch.compile(llm.model, dynamic=True)``, torch 2.14): the first call took 68 s (compiling),
after which 16 decode steps of a batch of 4 took 11 ms instead of 29 ms. Break-even is tens of
thousands of decode steps per process, any new shape risks a recompile, and a static cache would give up
the shared prefix and the row dropping above; so no flag is offered on CPU. On GPU (where CUDA graphs
remove launch overhead) it may pay for long-running actors; that is unmeasured here.

Shared per-frame features (the 336 frame of Lite, the frames of full, each (object, frame) crop) are not
a switch: ``processing_pixelrefer.plan_encoder_inputs`` keys every encoder image by its source and
final size, so the tower sees each one once per call (tested).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class PerfOptions:
    """Which inference optimisations are on (all defaults keep greedy outputs identical)."""

    native_decode: bool = True
    share_prefix: bool = True
    share_object_tokens: bool = True
    fast_kmeans: bool = True
    #: Shortest shared prefix worth a separate prefill call: below this the call overhead outweighs
    #: the saved tokens.
    min_shared_prefix: int = 16

    @classmethod
    def baseline(cls) -> "PerfOptions":
        """Everything off: transformers' ``generate``, no sharing, direct k-means distances."""
        return cls(
            native_decode=False,
            share_prefix=False,
            share_object_tokens=False,
            fast_kmeans=False,
        )
