"""``lstm-client``: the command line of lstm-serve.

    lstm-client [--target HOST:PORT] [--token T] [--timeout S] [--tls] [--ca-cert PEM] COMMAND
      info [--json]                 the served model
      generate PROMPT [options]     sample a continuation, printed as it arrives
      chat [options]                one session across turns: each stdin line is a prompt
      score FILE [--chunk-size N]   mean loss of a text file, in nats and bits per character

Exit status: 0 on success, 1 on an error (one line on stderr), 2 on a usage error.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
from collections.abc import Sequence
from typing import TextIO

from ._version import __version__
from .client import Client
from .datatypes import ModelInfo, TlsConfig
from .errors import LstmServeError

PROG = "lstm-client"
DEFAULT_TARGET = "127.0.0.1:50051"
TARGET_ENV = "LSTM_SERVE_TARGET"
TOKEN_ENV = "LSTM_SERVE_TOKEN"
DEFAULT_CHUNK = 256
CHAT_STOP = "\n\n"


class CliError(Exception):
    """An error to print as one line, exit status 1."""


# --------------------------------------------------------------------------- helpers


def _unescape(s: str) -> str:
    """Backslash escapes \\n, \\t, \\r and \\\\ in a command-line string."""
    out: list[str] = []
    i = 0
    while i < len(s):
        ch = s[i]
        if ch == "\\" and i + 1 < len(s) and s[i + 1] in "ntr\\":
            out.append({"n": "\n", "t": "\t", "r": "\r", "\\": "\\"}[s[i + 1]])
            i += 2
            continue
        out.append(ch)
        i += 1
    return "".join(out)


def check_vocab(text: str, vocab: Sequence[str], what: str) -> None:
    """Raise CliError naming the first character of ``text`` outside the vocabulary."""
    allowed = set(vocab)
    for i, ch in enumerate(text):
        if ch not in allowed:
            line = text.count("\n", 0, i) + 1
            col = i - (text.rfind("\n", 0, i) + 1) + 1
            raise CliError(
                f"character {ch!r} (U+{ord(ch):04X}) at line {line}, column {col} of {what} "
                f"is not in the model's vocabulary ({len(vocab)} characters)"
            )


def _timeout(value: str) -> float | None:
    try:
        t = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {value!r}") from None
    if math.isnan(t):
        raise argparse.ArgumentTypeError("timeout must be a number")
    return None if t <= 0 or math.isinf(t) else t


def _positive_int(value: str) -> int:
    try:
        n = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {value!r}") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {n}")
    return n


def _read_file(path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise CliError(f"cannot read {path}: {e.strerror or e}") from None


def _client(args: argparse.Namespace) -> Client:
    tls: TlsConfig | None = None
    if args.tls or args.ca_cert or args.server_name:
        roots = _read_file(args.ca_cert) if args.ca_cert else None
        tls = TlsConfig(root_certificates=roots, server_name_override=args.server_name)
    return Client(args.target, timeout=args.timeout, token=args.token or None, tls=tls)


def _write(out: TextIO, text: str) -> None:
    out.write(text)
    out.flush()


# --------------------------------------------------------------------------- commands


def _format_info(target: str, info: ModelInfo) -> str:
    lines = [
        f"target:             {target}",
        f"server version:     {info.server_version}",
        f"cell type:          {info.cell_type}",
        f"layers:             {info.num_layers}",
        f"hidden size:        {info.hidden_size}",
        f"embedding size:     {info.embedding_size}",
        f"vocabulary:         {info.vocab_size} characters {''.join(info.vocab)!r}",
        f"checkpoint sha256:  {info.checkpoint_sha256}",
        f"validation loss:    {info.val_loss:.4f} nats/char ({info.val_loss / math.log(2):.4f} bits/char)",
        f"device:             {info.device}",
        f"dtype:              {info.dtype}",
        "limits:",
    ]
    for f in dataclasses.fields(info.limits):
        lines.append(f"  {f.name + ':':<24}{getattr(info.limits, f.name)}")
    return "\n".join(lines) + "\n"


def cmd_info(args: argparse.Namespace, out: TextIO) -> int:
    with _client(args) as client:
        info = client.model_info()
    if args.json:
        data = dataclasses.asdict(info)
        data["target"] = args.target
        _write(out, json.dumps(data, indent=2, ensure_ascii=False) + "\n")
    else:
        _write(out, _format_info(args.target, info))
    return 0


def cmd_generate(args: argparse.Namespace, out: TextIO) -> int:
    prompt: str = args.prompt
    stops = [_unescape(s) for s in args.stop or []]
    with _client(args) as client:
        info = client.model_info()
        check_vocab(prompt, info.vocab, "the prompt")
        with client.session() as session:
            if args.echo:
                _write(out, prompt)
            last = prompt if args.echo else ""
            for tok in session.generate(
                prompt or None,
                max_tokens=args.max_tokens,
                temperature=args.temperature,
                top_k=args.top_k,
                top_p=args.top_p,
                seed=args.seed,
                stop=stops,
            ):
                _write(out, tok.text)
                last = tok.text or last
            if not last.endswith("\n"):
                _write(out, "\n")
    return 0


def cmd_chat(args: argparse.Namespace, out: TextIO, inp: TextIO, err: TextIO) -> int:
    interactive = inp.isatty()
    with _client(args) as client:
        info = client.model_info()
        with client.session() as session:
            if interactive:
                print(f"{PROG}: chatting with session {session.session_id}; end with Ctrl-D", file=err)
            turn = 0
            while True:
                if interactive:
                    err.write("> ")
                    err.flush()
                try:
                    line = inp.readline()
                except UnicodeDecodeError as e:
                    raise CliError(f"<stdin> is not UTF-8 text: {e}") from None
                if not line:
                    break
                turn += 1
                prompt = line.rstrip("\r\n") + "\n"
                try:
                    check_vocab(prompt, info.vocab, f"input line {turn}")
                except CliError as e:
                    print(f"{PROG}: error: {e}", file=err)
                    continue
                reply = ""
                for tok in session.generate(
                    prompt,
                    max_tokens=args.max_tokens,
                    temperature=args.temperature,
                    top_k=args.top_k,
                    top_p=args.top_p,
                    seed=args.seed,
                    stop=[CHAT_STOP],
                ):
                    _write(out, tok.text)
                    reply += tok.text
                if not reply.endswith(CHAT_STOP):
                    _write(out, "\n" if reply.endswith("\n") else "\n\n")
    return 0


def score_text(client: Client, text: str, *, chunk_size: int = DEFAULT_CHUNK) -> tuple[float, int]:
    """Mean loss (nats per character) of ``text`` under the served model, and how many
    characters were scored: every character but the first, each predicted from the ones
    before it. Streams the text through one new session over ``StreamSteps``."""
    info = client.model_info()
    check_vocab(text, info.vocab, "the text")
    if len(text) < 2:
        raise CliError("the text needs at least 2 characters to score")
    limit = info.limits.max_tokens_per_request
    if limit > 0:
        chunk_size = min(chunk_size, limit)
    index = {ch: i for i, ch in enumerate(info.vocab)}
    targets = [index[ch] for ch in text[1:]]
    feed = text[:-1]  # the output after feed[j] predicts text[j + 1]
    chunks = [feed[i : i + chunk_size] for i in range(0, len(feed), chunk_size)]
    timeout = None if client.timeout is None else client.timeout * max(1, len(chunks))
    total = 0.0
    j = 0
    with client.session() as session:
        for result in session.stream(chunks, top_k=0, return_logprobs=True, timeout=timeout):
            for o in result.outputs:
                if o.logprobs is None or len(o.logprobs) != len(info.vocab):
                    raise CliError("the server returned no full log-probabilities")
                total -= o.logprobs[targets[j]]
                j += 1
    if j != len(targets):
        raise CliError(f"the server returned {j} outputs for {len(targets)} characters")
    return total / j, j


def cmd_score(args: argparse.Namespace, out: TextIO, inp: TextIO) -> int:
    if args.file == "-":
        name = "<stdin>"
        try:
            text = inp.read()
        except UnicodeDecodeError as e:
            raise CliError(f"{name} is not UTF-8 text: {e}") from None
    else:
        raw = _read_file(args.file)
        name = args.file
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise CliError(f"{name} is not UTF-8 text: {e}") from None
    with _client(args) as client:
        try:
            nats, n = score_text(client, text, chunk_size=args.chunk_size)
        except CliError as e:
            raise CliError(str(e).replace("of the text", f"of {name}")) from None
    bits = nats / math.log(2)
    _write(
        out,
        f"file:        {name}\n"
        f"characters:  {len(text)} ({n} scored)\n"
        f"loss:        {nats:.4f} nats/char\n"
        f"bits:        {bits:.4f} bits/char\n"
        f"perplexity:  {math.exp(nats):.4f}\n",
    )
    return 0


# --------------------------------------------------------------------------- parser


def _add_connection_options(p: argparse.ArgumentParser, suppress: bool) -> None:
    def d(value: object) -> object:
        return argparse.SUPPRESS if suppress else value

    g = p.add_argument_group("connection")
    g.add_argument(
        "--target",
        default=d(os.environ.get(TARGET_ENV) or DEFAULT_TARGET),
        help=f"server address HOST:PORT (default: ${TARGET_ENV} or {DEFAULT_TARGET})",
    )
    g.add_argument("--token", default=d(os.environ.get(TOKEN_ENV)), help=f"bearer token (default: ${TOKEN_ENV})")
    g.add_argument(
        "--timeout",
        type=_timeout,
        default=d(30.0),
        help="deadline of each call in seconds; 0 for none (default: 30)",
    )
    g.add_argument("--tls", action="store_true", default=d(False), help="connect with TLS (system roots)")
    g.add_argument("--ca-cert", metavar="PEM", default=d(None), help="TLS with this CA bundle")
    g.add_argument("--server-name", metavar="NAME", default=d(None), help="TLS: verify the certificate against NAME")


def _add_sampling_options(p: argparse.ArgumentParser, max_tokens: int, temperature: float) -> None:
    p.add_argument("--max-tokens", type=_positive_int, default=max_tokens, help=f"(default: {max_tokens})")
    p.add_argument("--temperature", type=float, default=temperature, help=f"0 is greedy (default: {temperature})")
    p.add_argument("--top-k", type=int, default=0, help="sample among the k most likely; 0: all (default: 0)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling (default: 1.0)")
    p.add_argument("--seed", type=int, default=None, help="sampling seed (default: random)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Command-line client of lstm-serve (stateful character-level LSTM/GRU inference).",
        epilog="Connection options may also follow the command.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    _add_connection_options(parser, suppress=False)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser("info", help="print the served model's information")
    p.add_argument("--json", action="store_true", help="print JSON")
    _add_connection_options(p, suppress=True)

    p = sub.add_parser("generate", help="sample a continuation of PROMPT, printed as it arrives")
    p.add_argument("prompt", metavar="PROMPT", help="text fed before sampling (may be empty)")
    _add_sampling_options(p, max_tokens=200, temperature=1.0)
    p.add_argument("--stop", action="append", metavar="S", help=r"stop after S (repeatable; \n and \t are unescaped)")
    p.add_argument("--echo", action="store_true", help="print the prompt before the continuation")
    _add_connection_options(p, suppress=True)

    p = sub.add_parser("chat", help="interactive: each stdin line (+ newline) is a prompt; one session across turns")
    _add_sampling_options(p, max_tokens=300, temperature=0.8)
    _add_connection_options(p, suppress=True)

    p = sub.add_parser("score", help="mean loss of a text file in nats and bits per character")
    p.add_argument("file", metavar="FILE", help="UTF-8 text file ('-' for stdin)")
    p.add_argument(
        "--chunk-size",
        type=_positive_int,
        default=DEFAULT_CHUNK,
        help=f"characters per StreamSteps request (default: {DEFAULT_CHUNK})",
    )
    _add_connection_options(p, suppress=True)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # usage errors (2), --help and --version (0)
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 2)
    out, inp, err = sys.stdout, sys.stdin, sys.stderr
    if not args.target:
        parser.print_usage(err)
        print(f"{PROG}: error: --target must not be empty", file=err)
        return 2
    try:
        if args.command == "info":
            return cmd_info(args, out)
        if args.command == "generate":
            return cmd_generate(args, out)
        if args.command == "chat":
            return cmd_chat(args, out, inp, err)
        if args.command == "score":
            return cmd_score(args, out, inp)
        print(f"{PROG}: error: unknown command {args.command!r}", file=err)
        return 2
    except (LstmServeError, CliError) as e:
        _flush_quietly(out)
        print(f"{PROG}: error: {e}", file=err)
        return 1
    except KeyboardInterrupt:
        _flush_quietly(out)
        print(f"{PROG}: interrupted", file=err)
        return 130
    except BrokenPipeError:
        # The reader went away (e.g. `| head`); stop quietly.
        try:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, out.fileno())
        except (OSError, ValueError, AttributeError):
            pass
        return 1
    return 0


def _flush_quietly(stream: TextIO) -> None:
    try:
        stream.flush()
    except Exception:
        pass


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
