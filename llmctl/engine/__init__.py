"""Text generation: the one engine behind `llmctl generate`, evaluation and RL rollouts.

    engine.py    Engine, Result, Stream: the decode loop over a batch's per-row state
    sampling.py  SamplingParams, the sampler, penalties
    lookup.py    prompt lookup: n-gram drafts, the draft policy
    beam.py      beam search
    step.py      FastDecode: the decode step over the KV cache (PyTorch, and natively through llmctl/native/)
"""

from llmctl.engine.engine import Engine, Result, Stream
from llmctl.engine.sampling import SamplingParams, argmax, sample
from llmctl.engine.step import FastDecode

__all__ = ["Engine", "FastDecode", "Result", "SamplingParams", "Stream", "argmax", "sample"]
