"""Every Triton kernel of models/kernels as inductor re-emits it: a kernel that a ``torch.library.triton_op`` (or
any user-defined Triton kernel under torch.compile) launches is written out again by inductor, with the
``@triton.jit`` helpers it calls gathered by their own names. A helper imported under an alias (``rounded as
_rounded``) then is defined as ``rounded`` but called as ``_rounded``: the kernel compiles in eager mode and in
Triton's interpreter, and fails only inside a compiled step on the GPU (found there, 2026-12-07). This checks, on
the CPU, that in each kernel's re-emitted source every bare name it calls is defined there or is a builtin. The
sources come from a fresh interpreter without TRITON_INTERPRET (interpreted kernels keep no source for inductor)."""

from __future__ import annotations

import ast
import builtins

import pytest
from conftest import sm90_compile_report

pytest.importorskip("triton")

_RE_EMITTED = r"""
import importlib, json
import triton
from torch._inductor.codegen.wrapper import user_defined_triton_kernel_transitive_closure_source_code as source
out = {}
for mod in ("moe_decode", "rmsnorm", "rope", "router", "mla_prep", "mla_decode", "adamw"):
    m = importlib.import_module(f"moeflow.models.kernels.{mod}")
    for name, k in sorted(vars(m).items()):
        if isinstance(k, triton.runtime.jit.JITFunction) and k.fn.__module__ == m.__name__:
            out[f"{mod}.{name}"] = source(k)
print(json.dumps(out))
"""


def undefined_calls(source: str) -> set[str]:
    """Bare names called in ``source`` that it neither defines (def, import, assignment) nor are builtins."""
    tree = ast.parse(source)
    defined = {n.name for n in ast.walk(tree) if isinstance(n, ast.FunctionDef)}
    imports = [n for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom))]
    defined |= {(a.asname or a.name).split(".")[0] for n in imports for a in n.names}
    defined |= {t.id for n in ast.walk(tree) if isinstance(n, ast.Assign) for t in n.targets if isinstance(t, ast.Name)}
    called = {n.func.id for n in ast.walk(tree) if isinstance(n, ast.Call) and isinstance(n.func, ast.Name)}
    return {c for c in called if c not in defined and not hasattr(builtins, c)}


def test_the_check_sees_an_aliased_helper():
    src = "def rounded(v):\n    return v\n\ndef kernel(x):\n    return _rounded(x) + rounded(x) + min(x, 1)\n"
    assert undefined_calls(src) == {"_rounded"}


def test_inductor_re_emits_every_kernel_with_the_helpers_it_calls():
    sources = sm90_compile_report(_RE_EMITTED)  # runs the script without the interpreter; its JSON
    for mod in ("moe_decode", "rmsnorm", "rope", "router", "mla_prep", "mla_decode", "adamw"):
        assert any(k.startswith(mod + ".") for k in sources), mod
    bad = {name: sorted(undefined_calls(src)) for name, src in sources.items() if undefined_calls(src)}
    assert not bad, bad
