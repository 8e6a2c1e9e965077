"""Real inference engines to put behind Sluicegate, for the tests and the benches (`--engine-server llamacpp`).
Needs the `engines` extra (`pip install -e '.[engines]'`: llama-cpp-python's server and `gguf`); this module
imports them only when used, and says so when they are missing.

The model trick (`write_model`): a llama-architecture GGUF written here from one seed, no download. Its
vocabulary is SentencePiece-style with byte fallback (`<unk> <s> </s>`, the 256 byte tokens
`<0x00>`..`<0xFF>`, `▁` and the printable ASCII characters); its transformer blocks have random weights,
small next to the residual stream. The token embeddings are random orthogonal rows, and the output matrix
maps each token's row to the logit of its successor in a fixed table (`SUCCESSOR`), so greedy decoding
walks that table whatever the blocks compute (they still run in full: the model costs what its size says,
27 M parameters by default, 75-90 tokens/s on one thread here):
- after a lowercase letter, or anything not named below: the endless cycle `bcd...xyzé abc...`
  (`é` is two byte tokens: one character, two tokens);
- after an uppercase letter or a digit: `...XYZ€0123456789`, then `</s>` (`€` is three byte tokens).
  So a prompt ending in `A` gets exactly 38 tokens and `finish_reason: "stop"` at end-of-sequence, one
  ending in `5` gets `6789` and stops: a deterministic EOS (`answer_of_length` picks the ending).
The chat template is `<s>` then the message contents, concatenated: the last character of the prompt picks
the path. `continuation(text, max_tokens)` computes the engine's answer in Python.

`LlamaServer(model)` runs `python -m llama_cpp.server` on a free port of 127.0.0.1. That server runs one
request at a time (one model behind a lock; every route, `/v1/models` included, waits for it), and by
default a request arriving while a stream runs ends that stream with a bare `[DONE]`; `LlamaServer` turns
that off (`interrupt_requests=False`), so requests queue instead.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from sluicegate.embedded import free_port

ENGINES_EXTRA = "pip install -e '.[engines]' (or pip install 'sluicegate[engines]')"


class EnginesMissing(RuntimeError):
    """The `engines` extra is not installed."""


def require_engines(*modules: str) -> None:
    """Raise EnginesMissing naming the `engines` extra unless every module can be imported."""
    missing = []
    for name in modules:
        try:
            found = importlib.util.find_spec(name) is not None
        except (ImportError, ValueError):
            found = False
        if not found:
            missing.append(name)
    if missing:
        raise EnginesMissing(f"{', '.join(missing)} not installed: a real engine needs the `engines` extra: "
                             f"{ENGINES_EXTRA}")


# ---- the vocabulary ------------------------------------------------------------------------------
UNK, BOS, EOS = 0, 1, 2
BYTE0 = 3  # <0x00> .. <0xFF>: ids 3 .. 258
SPACE = BYTE0 + 256  # "▁", what SentencePiece writes for " "
ASCII0 = SPACE + 1  # "!" .. "~": ids 260 .. 353
PRINTABLE = [chr(c) for c in range(0x21, 0x7F)]
N_VOCAB = ASCII0 + len(PRINTABLE)


def pieces() -> list[str]:
    """The token pieces, in id order."""
    return ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + ["▁"] + PRINTABLE


def vocabulary() -> tuple[list[str], list[float], list[int]]:
    """Pieces, scores and token types (gguf's), in id order."""
    require_engines("gguf")
    import gguf

    types = ([gguf.TokenType.UNKNOWN, gguf.TokenType.CONTROL, gguf.TokenType.CONTROL]
             + [gguf.TokenType.BYTE] * 256 + [gguf.TokenType.NORMAL] * (1 + len(PRINTABLE)))
    scores = [0.0] * 3 + [0.0] * 256 + [-float(i) for i in range(1 + len(PRINTABLE))]
    return pieces(), scores, [int(t) for t in types]


def token_of(char: str) -> list[int]:
    """The token ids of one character, as the tokenizer writes it (byte fallback outside the vocab)."""
    if char == " ":
        return [SPACE]
    if char in PRINTABLE:
        return [ASCII0 + PRINTABLE.index(char)]
    return [BYTE0 + b for b in char.encode()]


def chain(text: str) -> list[int]:
    return [t for char in text for t in token_of(char)]


CYCLE = "abcdefghijklmnopqrstuvwxyzé "  # 28 characters, 29 tokens, forever
TO_EOS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ€0123456789"  # 37 characters, 39 tokens, then </s>


def successor_table(n_vocab: int) -> list[int]:
    """The greedy successor of every token id."""
    default = token_of("a")[0]
    table = [default] * n_vocab
    cycle = chain(CYCLE)
    for i, token in enumerate(cycle):
        table[token] = cycle[(i + 1) % len(cycle)]
    to_eos = chain(TO_EOS)
    for i, token in enumerate(to_eos):
        table[token] = to_eos[i + 1] if i + 1 < len(to_eos) else EOS
    return table


SUCCESSOR = successor_table(N_VOCAB)


def detokenize(tokens: list[int], names: list[str] | None = None) -> str:
    names = names or pieces()
    data = b""
    for token in tokens:
        piece = names[token]
        if piece.startswith("<0x"):
            data += bytes([int(piece[3:5], 16)])
        else:
            data += piece.replace("▁", " ").encode()
    return data.decode(errors="replace")


def continuation(text: str, max_tokens: int) -> tuple[str, int, str]:
    """What greedy decoding generates after a prompt ending in `text`: (text, tokens, finish_reason).
    Counted as the engine counts (`usage.completion_tokens`: generated tokens, not the `</s>`)."""
    last = chain(text[-1:])[-1] if text else BOS
    out: list[int] = []
    while len(out) < max_tokens:
        last = SUCCESSOR[last]
        if last == EOS:
            return detokenize(out), len(out), "stop"
        out.append(last)
    return detokenize(out), len(out), "length"


def answer_of_length(tokens: int) -> tuple[str, str]:
    """(last character of a prompt, the answer): an uppercase letter or digit after which the engine
    generates exactly `tokens` tokens and then its end-of-sequence (1-9 or 13-38 tokens)."""
    for char in "9876543210ZYXWVUTSRQPONMLKJIHGFEDCBA":
        text, count, finish = continuation(char, 64)
        if count == tokens and finish == "stop" and count > 0:
            return char, text
    raise ValueError(f"no prompt ending gives an answer of {tokens} tokens then end-of-sequence: "
                     "pick 1-9 (a digit) or 13-38 (an uppercase letter)")


# ---- the model -----------------------------------------------------------------------------------
CHAT_TEMPLATE = "{{ bos_token }}{% for message in messages %}{{ message['content'] }}{% endfor %}"


def write_model(path: str | os.PathLike[str], *, seed: int = 1234, n_embd: int = 512, n_layer: int = 8,
                n_ff: int = 1536, n_head: int = 8, n_head_kv: int = 8, n_ctx: int = 4096,
                chat_template: str | None = CHAT_TEMPLATE) -> Path:
    """Write the model (see the module doc) to `path` (about 55 MB, 1-2 s by default); the same
    arguments write the same bytes. `chat_template=None` writes none (llama-cpp-python then falls back
    to its `llama-2` format, which never continues a trailing assistant message)."""
    require_engines("gguf", "numpy")
    import gguf
    import numpy as np

    names, scores, types = vocabulary()
    n_vocab = len(names)
    if n_embd < n_vocab:
        raise ValueError(f"n_embd must be >= the vocabulary ({n_vocab}) for orthogonal embeddings")
    rng = np.random.default_rng(seed)

    # Embeddings: orthogonal rows of norm sqrt(n_embd) * 8 (root mean square 8: the blocks add little to it).
    q, _ = np.linalg.qr(rng.standard_normal((n_embd, n_embd)))
    embd = (q[:n_vocab] * np.sqrt(n_embd) * 8.0).astype(np.float32)
    # Output: logit(j) = SCALE * [token is a predecessor of j], read off the normalized residual.
    scale = 30.0
    output = np.zeros((n_vocab, n_embd), dtype=np.float32)
    for token, successor in enumerate(SUCCESSOR):  # the normalized residual is about q[token] * sqrt(n_embd)
        output[successor] += q[token] * scale / np.sqrt(n_embd)

    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("sluicegate-test-llama")
    writer.add_context_length(n_ctx)
    writer.add_embedding_length(n_embd)
    writer.add_block_count(n_layer)
    writer.add_feed_forward_length(n_ff)
    writer.add_head_count(n_head)
    writer.add_head_count_kv(n_head_kv)
    writer.add_rope_dimension_count(n_embd // n_head)
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_F16)
    writer.add_vocab_size(n_vocab)
    writer.add_tokenizer_model("llama")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(names)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    writer.add_unk_token_id(UNK)
    writer.add_bos_token_id(BOS)
    writer.add_eos_token_id(EOS)
    writer.add_add_bos_token(True)
    writer.add_add_eos_token(False)
    writer.add_add_space_prefix(False)
    if chat_template is not None:
        writer.add_chat_template(chat_template)

    def weight(rows: int, cols: int, std: float) -> np.ndarray:
        return (rng.standard_normal((rows, cols), dtype=np.float32) * std).astype(np.float16)

    writer.add_tensor("token_embd.weight", embd.astype(np.float16))
    writer.add_tensor("output_norm.weight", np.ones(n_embd, dtype=np.float32))
    writer.add_tensor("output.weight", output.astype(np.float16))
    head_dim = n_embd // n_head
    std, out_std = 1.0 / np.sqrt(n_embd), 0.2 / np.sqrt(n_embd * n_layer)
    for i in range(n_layer):
        writer.add_tensor(f"blk.{i}.attn_norm.weight", np.ones(n_embd, dtype=np.float32))
        writer.add_tensor(f"blk.{i}.attn_q.weight", weight(n_embd, n_embd, std))
        writer.add_tensor(f"blk.{i}.attn_k.weight", weight(n_head_kv * head_dim, n_embd, std))
        writer.add_tensor(f"blk.{i}.attn_v.weight", weight(n_head_kv * head_dim, n_embd, std))
        writer.add_tensor(f"blk.{i}.attn_output.weight", weight(n_embd, n_embd, out_std))
        writer.add_tensor(f"blk.{i}.ffn_norm.weight", np.ones(n_embd, dtype=np.float32))
        writer.add_tensor(f"blk.{i}.ffn_gate.weight", weight(n_ff, n_embd, std))
        writer.add_tensor(f"blk.{i}.ffn_up.weight", weight(n_ff, n_embd, std))
        writer.add_tensor(f"blk.{i}.ffn_down.weight", weight(n_embd, n_ff, out_std))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return Path(path)


# ---- the server ----------------------------------------------------------------------------------
def llama_cpp_version() -> str:
    """The installed llama-cpp-python's version (without importing it: that loads libllama)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("llama_cpp_python")
    except PackageNotFoundError:
        return "not installed"


def describe_llama_bench(ending: str, answer: str, tokens: int) -> str:
    """How a bench names this engine server and what it asked of it."""
    return (f"engine server llama-cpp-python {llama_cpp_version()} (one request at a time, 1 thread), generated "
            f"27 M model: prompts end in {ending!r}, answer {answer!r} ({tokens} token{'s' if tokens != 1 else ''}) "
            f"then end-of-sequence")


class LlamaServer:
    """`python -m llama_cpp.server` for `model` on a free port of 127.0.0.1, up once `/v1/models` answers
    (about 1 s). One thread, `n_ctx` 2048, `interrupt_requests` off (see the module doc; pass
    `interrupt_requests=True` for the server's default).

    `url` is the OpenAI base URL (`--backend-url`); `alias` the model id it serves; the server's output
    goes to `log` (a file beside the model unless given). `extra` adds or overrides server flags
    (`{"interrupt_requests": "True"}`, `{"n_threads": "2"}`, ...)."""

    def __init__(self, model: str | os.PathLike[str], *, alias: str = "tiny-llama", n_ctx: int = 2048,
                 n_threads: int = 1, log: str | os.PathLike[str] | None = None, startup_timeout: float = 60,
                 **extra: Any) -> None:
        self.model = Path(model)
        self.alias = alias
        self.port = free_port()
        self.log_path = Path(log) if log else self.model.with_suffix(f".{self.port}.log")
        self.startup_timeout = startup_timeout
        flags = {"model": str(self.model), "model_alias": alias, "host": "127.0.0.1", "port": str(self.port),
                 "n_ctx": str(n_ctx), "n_threads": str(n_threads), "n_threads_batch": str(n_threads),
                 "interrupt_requests": "False", "verbose": "False", **{k: str(v) for k, v in extra.items()}}
        self.command = [sys.executable, "-m", "llama_cpp.server"]
        for name, value in flags.items():
            self.command += [f"--{name}", value]
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def root(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        return f"{self.root}/v1"

    @property
    def pid(self) -> int:
        assert self.proc is not None, "not started"
        return self.proc.pid

    def start(self) -> LlamaServer:
        require_engines("llama_cpp", "uvicorn", "sse_starlette", "starlette_context", "pydantic_settings")
        # The server's settings are pydantic BaseSettings: HOST, PORT and CONFIG_FILE in the environment
        # would override the flags.
        env = {k: v for k, v in os.environ.items() if k not in {"HOST", "PORT", "CONFIG_FILE"}}
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(self.command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         env=env, start_new_session=True)
        deadline = time.monotonic() + self.startup_timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"llama_cpp.server exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(f"{self.url}/models", timeout=5) as response:
                    if response.status == 200 and json.loads(response.read())["data"]:
                        return self
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise TimeoutError(f"llama_cpp.server did not answer /v1/models in {self.startup_timeout:g} s:\n"
                                   f"{self.log_tail()}")
            time.sleep(0.1)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def log_tail(self, lines: int = 30) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        return ""

    def __enter__(self) -> LlamaServer:
        return self.start()

    def __exit__(self, *_: object) -> None:
        self.stop()

    # ---- talking to it directly (no Sluicegate) -----------------------------------------------
    def chat(self, body: dict[str, Any], timeout: float = 60) -> dict[str, Any]:
        """A non-streamed chat completion, straight from the engine."""
        request = urllib.request.Request(f"{self.url}/chat/completions", method="POST",
                                         data=json.dumps({"model": self.alias, **body, "stream": False}).encode(),
                                         headers={"content-type": "application/json"})
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return json.loads(response.read())


@contextlib.contextmanager
def generated_llama_server(directory: str | os.PathLike[str] | None = None, *,
                           model_options: dict[str, Any] | None = None, **server_options: Any) -> Iterator[LlamaServer]:
    """Write the model into `directory` (a temp dir, removed afterwards, unless given), start a
    `LlamaServer` for it (`server_options`), yield it, stop it. Raises EnginesMissing without the extra."""
    require_engines("gguf", "numpy", "llama_cpp")
    own = directory is None
    folder = Path(tempfile.mkdtemp(prefix="sg-llama-")) if directory is None else Path(directory)
    try:
        model = write_model(folder / "tiny-llama.gguf", **(model_options or {}))
        with LlamaServer(model, **server_options) as server:
            yield server
    finally:
        if own:
            shutil.rmtree(folder, ignore_errors=True)
