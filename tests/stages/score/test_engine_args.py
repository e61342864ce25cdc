"""The judge's vLLM arguments exist in vLLM 0.32, and data parallel is several engines.

No GPU and no engine start: the arguments are checked against the fields of vLLM's
``EngineArgs`` (what ``LLM(**kwargs)`` builds), and the engine layout against a fake cluster;
each request's ``SamplingParams`` are built as the engine builds them.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from types import SimpleNamespace

import pytest

from curate.core.executors import ExecutorConfig
from curate.stages.score.engines import EngineError, llm_kwargs, logprob_steps, sampling_params
from curate.stages.score.labels import LabelSet
from curate.stages.score.ray_engine import EngineLayoutError, engine_layout, engine_settings
from tests.stages.score.conftest import score_config

vllm_args = pytest.importorskip("vllm.engine.arg_utils")

MODEL = Path("/models/judge")


def _engine_fields() -> set[str]:
    return {f.name for f in dataclasses.fields(vllm_args.EngineArgs)}


@pytest.mark.parametrize(
    "settings",
    [
        {},
        {"tensor_parallel_size": 2},
        {"vlm": True, "gpu_memory_utilization": 0.85, "kv_cache_memory_bytes": None},
        {"tensor_parallel_size": 4, "enforce_eager": False, "tokenizer": Path("/tok")},
    ],
)
@pytest.mark.parametrize("on_cpu", [True, False])
def test_every_llm_argument_is_an_engine_arg(settings, on_cpu):
    """Every key ``_make_llm`` passes is an ``EngineArgs`` field, the dataclass takes the
    values, tensor parallel goes as ``tensor_parallel_size`` and no ``data_parallel_size``
    is ever passed."""
    kwargs = llm_kwargs(score_config(**settings), MODEL, on_cpu=on_cpu)
    assert set(kwargs) <= _engine_fields(), set(kwargs) - _engine_fields()
    assert "data_parallel_size" not in kwargs
    assert kwargs["tensor_parallel_size"] == settings.get("tensor_parallel_size", 1)
    args = vllm_args.EngineArgs(**kwargs)  # the dataclass LLM builds from them
    assert args.tensor_parallel_size == kwargs["tensor_parallel_size"]
    # One process for one GPU; vLLM's own workers for tensor parallel.
    single = kwargs["tensor_parallel_size"] == 1
    assert (kwargs.get("distributed_executor_backend") == "uni") == single


def test_vllm_refuses_data_parallel_in_one_llm():
    """Why data parallel is not an LLM argument: vLLM 0.32 refuses it in one process (before
    it loads anything)."""
    from vllm import LLM

    with pytest.raises(ValueError, match="data_parallel_size=2"):
        LLM(model=str(MODEL), data_parallel_size=2)


@pytest.mark.parametrize(
    "settings", [{"data_parallel_size": 2}, {"engine_kwargs": {"data_parallel_size": 2}}]
)
def test_data_parallel_in_one_process_is_a_one_line_error(settings):
    with pytest.raises(EngineError, match="Ray executor"):
        llm_kwargs(score_config(**settings), MODEL, on_cpu=False)


def _cluster(gpus: float, **executor) -> SimpleNamespace:
    return SimpleNamespace(
        config=ExecutorConfig(kind="ray", **executor),
        resources=lambda: {"GPU": gpus},
        where="ray://fake",
    )


def test_data_parallel_is_engine_actors():
    """score.data_parallel_size engines of tensor_parallel_size GPUs each, every one a
    single-replica vLLM whose arguments are valid engine args."""
    cfg = score_config(data_parallel_size=3, tensor_parallel_size=2)
    assert engine_layout(cfg, _cluster(8)) == (3, 2)
    assert engine_layout(cfg, _cluster(8, engines=3)) == (3, 2)
    with pytest.raises(EngineLayoutError, match="need 6"):
        engine_layout(cfg, _cluster(4))
    with pytest.raises(EngineLayoutError, match="disagree"):
        engine_layout(cfg, _cluster(8, engines=2))
    # Without data_parallel_size: as many engines as the cluster holds (unchanged).
    assert engine_layout(score_config(tensor_parallel_size=2), _cluster(8)) == (4, 2)
    each = engine_settings(cfg)
    kwargs = llm_kwargs(each, MODEL, on_cpu=False)
    assert each.data_parallel_size == 1 and kwargs["tensor_parallel_size"] == 2
    assert kwargs["distributed_executor_backend"] == "mp"
    assert set(kwargs) <= _engine_fields()


@pytest.fixture(scope="module")
def labels(tokenizer_dir) -> LabelSet:
    from transformers import AutoTokenizer

    return LabelSet(AutoTokenizer.from_pretrained(tokenizer_dir))


@pytest.mark.parametrize("kind", ["probe", "constrained", "follow-up"])
def test_requests_ask_for_the_label_logprobs_only(labels, kind):
    """No ``logprobs=N`` beside ``logprob_token_ids``: vLLM's sampler would compute a top-k over
    the vocabulary every step and then return the label tokens' logprobs instead. Flat lists
    spare one Logprob object per token and step; no request detokenizes what is not read."""
    one = labels.probe_token
    params = sampling_params(
        labels, probe=kind == "probe", next_after=one if kind == "follow-up" else None
    )
    ids = sorted(labels.next[one]) if kind == "follow-up" else labels.logprob_token_ids
    assert params.logprobs is None and params.logprob_token_ids == ids
    assert params.num_logprobs == len(ids) and params.flat_logprobs
    assert params.temperature == 0.0
    assert params.detokenize == (kind == "constrained")  # only the choice's text is read
    assert params.max_tokens == {"probe": 2, "constrained": 2, "follow-up": 1}[kind]
    if kind == "probe":
        assert set(params.logit_bias) == {one} and params.structured_outputs is None


def test_flat_and_nested_logprobs_read_alike():
    from vllm.logprobs import FlatLogprobs, Logprob

    nested = [{22: Logprob(-0.5, 1), 2: Logprob(-1.5, 3)}, {21: Logprob(-0.1, 1)}]
    flat = FlatLogprobs()
    flat.extend(nested)
    want = [{22: -0.5, 2: -1.5}, {21: -0.1}]
    assert logprob_steps(flat) == logprob_steps(nested) == want
    assert logprob_steps(None) == logprob_steps(FlatLogprobs()) == []
