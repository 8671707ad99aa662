"""lm-eval-harness adapter: a ``moeflow`` model for ``lm_eval`` (pinned 0.4.13) over ``ModelLM``.

    python -m moeflow.platform.eval.lm_harness --model moeflow \\
        --model_args model=moe-tiny@pretrained,batch_size=8 --tasks my_task --include_path configs/eval/lm_eval

``model`` takes every reference ``model_refs.resolve`` knows (a directory, a store URI,
``catalog:<id>``, ``<name>@<alias>``, ``<name>/<version>``); ``tokenizer`` is needed only for a
bare checkpoint. lm-eval 0.4.13 finds models through its own registry and has no plugin entry
point, so the plain ``lm_eval`` console script cannot see a model defined outside its package:
this module registers ``moeflow`` (``register()``) and then runs lm-eval's own CLI unchanged, and
``evaluate(...)`` does the same for ``lm_eval.simple_evaluate``. Nothing reaches the network:
task data come from local files (``dataset_path: json`` + ``data_files``), HF hub access stays off.

The three request types map one to one onto ``ModelLM`` (``models/eval/lm.py``), so lm-eval and
moeflow's own tasks score a model the same way: ``loglikelihood`` (context, continuation) pairs,
``loglikelihood_rolling`` documents, ``generate_until`` (context, {until, max_gen_toks,
temperature, do_sample}) through the batched latent-cache generation. Chat templates are not
offered to lm-eval (``apply_chat_template`` would have to return text, and our markers are
special ids that plain text never encodes to); use moeflow's ``chat: true`` tasks for that.
"""

from __future__ import annotations

import os
import sys
from typing import Any

NAME = "moeflow"


def _offline() -> None:
    for key, value in {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
                       "HF_DATASETS_TRUST_REMOTE_CODE": "0", "TOKENIZERS_PARALLELISM": "false"}.items():
        os.environ.setdefault(key, value)


def _lm_class():
    from lm_eval.api.model import LM

    from moeflow.models.eval.lm import ModelLM

    from .. import model_refs

    class MoeflowLM(LM):
        """lm-eval's ``LM`` over a moeflow model + tokenizer (see the module docstring)."""

        def __init__(self, model: str | None = None, tokenizer: str | None = None, batch_size: Any = 8,
                     device: str | None = None, max_length: Any = None, dtype: str | None = None, seed: Any = 0,
                     **unused: Any) -> None:
            super().__init__()
            if not model:
                raise ValueError("moeflow: --model_args model=<dir | store URI | catalog:<id> | name@alias> is required")
            if not device or (str(device).startswith("cuda") and not _cuda()):  # lm-eval's default is "cuda"
                device = "cuda" if _cuda() else "cpu"
            torch_dtype = None
            if dtype:
                import torch

                torch_dtype = getattr(torch, str(dtype))
            loaded = model_refs.load(str(model), device=device, dtype=torch_dtype, tokenizer=tokenizer)
            bs = 8 if str(batch_size).startswith("auto") else int(batch_size)
            self.loaded = loaded
            self.lm = ModelLM(loaded.model, loaded.tokenizer, batch_size=bs,
                              max_len=int(max_length) if max_length else None)
            self.seed = int(seed)
            self._device = device

        @property
        def tokenizer_name(self) -> str:
            return f"moeflow:{self.loaded.ref.label}"

        def loglikelihood(self, requests) -> list[tuple[float, bool]]:
            return self.lm.loglikelihood([tuple(r.args[:2]) for r in requests])

        def loglikelihood_rolling(self, requests) -> list[float]:
            return self.lm.loglikelihood_rolling([r.args[0] for r in requests])

        def generate_until(self, requests) -> list[str]:
            out: list[str | None] = [None] * len(requests)
            groups: dict[tuple, list[int]] = {}
            for i, r in enumerate(requests):
                kw = dict(r.args[1] or {})
                until = kw.get("until") or []
                until = [until] if isinstance(until, str) else list(until)
                temp = float(kw.get("temperature", 0.0)) if kw.get("do_sample", False) else 0.0
                key = (tuple(until), int(kw.get("max_gen_toks", 256)), temp, kw.get("top_p"))
                groups.setdefault(key, []).append(i)
            for (until, max_new, temp, top_p), idx in groups.items():
                prompts = [self.lm.tokenizer.encode(requests[i].args[0], add_bos=True) for i in idx]
                texts = self.lm.generate(prompts, max_new_tokens=max_new, stop=until, temperature=temp,
                                         top_p=top_p, seed=self.seed, stop_at_end_of_turn=False)
                for i, t in zip(idx, texts):
                    out[i] = t
            return out  # type: ignore[return-value]

    return MoeflowLM


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def register() -> None:
    """Add ``moeflow`` to lm-eval's model registry (idempotent), keeping its own models listed."""
    import lm_eval.models  # noqa: F401  (fills the registry with lm-eval's models first)
    from lm_eval.api.registry import model_registry

    if NAME not in model_registry:
        model_registry.register(NAME, target=_lm_class())


def evaluate(model: str, tasks: list[str], *, include_path: str | None = None, batch_size: int = 8,
             limit: int | None = None, model_args: str = "", **kwargs) -> dict:
    """``lm_eval.simple_evaluate`` with the moeflow model; returns lm-eval's results dict."""
    _offline()
    register()
    import lm_eval
    from lm_eval.tasks import TaskManager

    args = f"model={model}" + (f",{model_args}" if model_args else "")
    return lm_eval.simple_evaluate(model=NAME, model_args=args, tasks=tasks, batch_size=batch_size, limit=limit,
                                   task_manager=TaskManager(include_path=include_path), **kwargs)


def main(argv: list[str] | None = None) -> None:
    """lm-eval's CLI with ``moeflow`` registered (same arguments as ``lm_eval``)."""
    _offline()
    register()
    from lm_eval.__main__ import cli_evaluate

    if argv is not None:
        sys.argv = [sys.argv[0], *argv]
    cli_evaluate()


if __name__ == "__main__":
    main()
