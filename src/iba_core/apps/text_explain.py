"""``iba explain --texts``: per-token bits for a text classifier.

The user names the model (as for images) and a tokenizer factory, ``--tokenizer
module:factory`` or ``file.py:factory``: a callable returning the tokenizer (or the
tokenizer itself).  The tokenizer is either

- a callable ``text -> ids`` (a list of integer token ids, or a mapping with
  ``"input_ids"`` as Hugging Face tokenizers return), or
- an object with ``encode(text) -> ids``;

token strings for the outputs come from its ``convert_ids_to_tokens(ids)`` or
``id_to_token(id)`` if it has one, else its ``vocab`` (a list or a token -> id mapping),
else the ids themselves.  Its ``pad_token_id`` (else ``--pad-id``, default 0) fills the
positions after each text: texts of different lengths are explained together, each with
its attention mask, so padding gets no noise and exactly 0 bits; the texts of
``--estimate-from`` are padded alike, and their padding stays out of the feature
statistics.  The model is called with the token ids ``(N, T)`` alone (integers, never
cast to float).
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..contract import Backend, RunFailure, UsageError
from .loading import first_line, import_factory

__all__ = ["Tokenizer", "cmd_explain_text", "read_texts"]


class Tokenizer:
    """The user's tokenizer behind one interface: :meth:`ids` and :meth:`tokens`."""

    def __init__(self, spec: str) -> None:
        try:
            obj = import_factory(spec)
        except UsageError as exc:
            raise UsageError(str(exc).replace("model spec", "--tokenizer")) from None
        if _is_factory(obj):
            try:
                obj = obj()
            except Exception as exc:
                raise UsageError(
                    f"--tokenizer {spec!r}: calling the factory failed with {first_line(exc)}"
                ) from None
        if not callable(obj) and not callable(getattr(obj, "encode", None)):
            raise UsageError(
                f"--tokenizer {spec!r} gave a {type(obj).__name__}: expected a callable text -> "
                "token ids, or an object with encode(text)"
            )
        self.spec, self.tokenizer = spec, obj
        pad = getattr(obj, "pad_token_id", None)
        self.pad_id: int | None = int(pad) if isinstance(pad, (int, np.integer)) else None

    def ids(self, text: str) -> list[int]:
        tok = self.tokenizer
        try:
            out = tok.encode(text) if callable(getattr(tok, "encode", None)) else tok(text)
        except Exception as exc:
            raise UsageError(
                f"--tokenizer {self.spec!r} failed on {text[:40]!r}: {first_line(exc)}"
            ) from None
        if isinstance(out, Mapping) or hasattr(out, "input_ids"):
            out = out["input_ids"] if isinstance(out, Mapping) else out.input_ids
        ids = np.asarray(out)
        if ids.ndim == 2 and ids.shape[0] == 1:
            ids = ids[0]
        if ids.ndim != 1 or (ids.size and ids.dtype.kind not in "iu"):
            raise UsageError(
                f"--tokenizer {self.spec!r} returned {type(out).__name__} of shape {ids.shape} "
                f"(dtype {ids.dtype}) for a text; it must return a list of integer token ids"
            )
        return [int(i) for i in ids]

    def tokens(self, ids: Sequence[int]) -> list[str]:
        tok = self.tokenizer
        convert = getattr(tok, "convert_ids_to_tokens", None)
        if callable(convert):
            return [str(t) for t in convert(list(ids))]
        one = getattr(tok, "id_to_token", None)
        if callable(one):
            return [str(one(i)) for i in ids]
        vocab = getattr(tok, "vocab", None)
        if isinstance(vocab, Mapping):
            names = {int(v): str(k) for k, v in vocab.items()}
            return [names.get(i, str(i)) for i in ids]
        if isinstance(vocab, Sequence) and not isinstance(vocab, str):
            return [str(vocab[i]) if 0 <= i < len(vocab) else str(i) for i in ids]
        return [str(i) for i in ids]


def _is_factory(obj: Any) -> bool:
    """A class or a function taking no arguments (not a tokenizer that takes the text)."""
    import inspect

    if isinstance(obj, type):
        return True
    if not inspect.isfunction(obj):
        return False
    required = [
        p
        for p in inspect.signature(obj).parameters.values()
        if p.default is p.empty and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
    ]
    return not required


def read_texts(paths: Sequence[str], option: str) -> list[str]:
    """The non-empty lines of text files (one example per line)."""
    texts: list[str] = []
    for p in paths:
        path = Path(p)
        if not path.is_file():
            raise UsageError(f"{option}: no such file: {path}")
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as exc:
            raise UsageError(f"{option}: cannot read {path} as UTF-8 text ({first_line(exc)})") from None
        texts.extend(line.strip() for line in lines if line.strip())
    if not texts:
        raise UsageError(f"{option}: the files hold no text (one example per line)")
    return texts


def encode(
    tokenizer: Tokenizer, texts: Sequence[str], length: int | None, pad_id: int
) -> tuple[np.ndarray, np.ndarray]:
    """Token ids ``(N, T)`` int64, padded with ``pad_id``, and the attention mask ``(N, T)``.

    ``T`` is ``length`` (longer texts are cut, with a warning), else the longest text's."""
    rows = [tokenizer.ids(t) for t in texts]
    empty = [i for i, r in enumerate(rows) if not r]
    if empty:
        raise UsageError(f"the tokenizer gave no tokens for line(s) {[i + 1 for i in empty][:10]}")
    t = length or max(len(r) for r in rows)
    cut = sum(len(r) > t for r in rows)
    if cut:
        warnings.warn(f"{cut} text(s) longer than {t} tokens were cut to --max-length", stacklevel=2)
    ids = np.full((len(rows), t), pad_id, dtype=np.int64)
    mask = np.zeros((len(rows), t), dtype=np.int64)
    for i, r in enumerate(rows):
        r = r[:t]
        ids[i, : len(r)] = r
        mask[i, : len(r)] = 1
    return ids, mask


def _tensor(backend: Backend, model: Any, ids: np.ndarray) -> Any:
    return backend.to_device(backend.from_numpy(np.ascontiguousarray(ids)), model)


def _logits(backend: Backend, model: Any, ids: np.ndarray, batch: int) -> np.ndarray:
    from ..engines import model_logits

    outs = []
    for i in range(0, len(ids), batch):
        try:
            with backend.frozen(model):
                out = model_logits(backend.call(model, _tensor(backend, model, ids[i : i + batch])))
        except Exception as exc:
            raise UsageError(
                f"the model failed on token ids of shape {ids[i : i + batch].shape}: {first_line(exc)} "
                "(iba explain --texts calls the model with the ids (N, T) alone)"
            ) from None
        logits = np.asarray(backend.to_numpy(out))
        if logits.ndim != 2:
            raise UsageError(f"the model returns {logits.shape}; iba explain needs logits (N, classes)")
        outs.append(logits)
    return np.concatenate(outs)


def cmd_explain_text(args: argparse.Namespace) -> int:
    """``iba explain MODEL --layer L --texts FILE --tokenizer SPEC ...``."""
    from . import cli

    _check_text_options(args)
    out = cli.check_out(Path(args.out))
    if args.save_estimate is not None:
        cli.check_writable(Path(args.save_estimate), "--save-estimate", folder=False)
    texts = read_texts(args.texts, "--texts")
    est_texts = read_texts(args.estimate_from, "--estimate-from") if args.estimate_from else []
    if args.estimate is not None and not Path(args.estimate).is_file():
        raise UsageError(f"--estimate: no such file: {args.estimate}")
    tokenizer = Tokenizer(args.tokenizer)
    pad_id = (
        args.pad_id if args.pad_id is not None else (tokenizer.pad_id if tokenizer.pad_id is not None else 0)
    )
    ids, mask = encode(tokenizer, texts, args.max_length, pad_id)
    length = int(ids.shape[1])

    backend = cli.select_backend(args.backend, args.model)
    model = backend.load_model(args.model, weights=args.weights, device=args.device)
    cli._check_layer(backend, model, args.layer)
    logits = _logits(backend, model, ids, cli.PREDICT_BATCH)
    n_classes = int(logits.shape[1])
    predicted = logits.argmax(axis=1)
    if args.target is not None and not 0 <= args.target < n_classes:
        raise UsageError(
            f"--target {args.target} is out of range: the model has {n_classes} classes (0..{n_classes - 1})"
        )
    targets = np.full(len(ids), args.target, dtype=np.int64) if args.target is not None else predicted

    engine, feature_shape = _token_bottleneck(args, backend, model, ids, length)
    if args.estimate is not None:
        engine.estimator = cli._load_estimate(Path(args.estimate), tuple(feature_shape), args.layer)
    else:
        from ..engines import estimation_batches

        # The estimation texts' padding stays out of the statistics (as it gets no noise
        # in the explanation).
        est_ids, est_mask = encode(tokenizer, est_texts[: args.n_samples], length, pad_id)
        batches = estimation_batches(
            est_ids,
            64,
            attention_mask=est_mask,
            backend=backend,
            convert=lambda ids: _tensor(backend, model, ids),
        )
        engine.estimate(batches, n_samples=len(est_ids), progbar=False)

    bits = _token_maps(args, backend, model, engine, ids, mask, targets)
    total = bits.sum(axis=1)

    tokens = [tokenizer.tokens(list(row[m > 0])) for row, m in zip(ids, mask, strict=True)]
    records = [
        {
            "line": k + 1,
            "text": text,
            "tokens": toks,
            "bits": [round(float(b), 6) for b in row[: len(toks)]],
            "target": int(t),
            "predicted": int(p),
            "total_bits": round(float(s), 6),
        }
        for k, (text, toks, row, t, p, s) in enumerate(
            zip(texts, tokens, bits, targets, predicted, total, strict=True)
        )
    ]
    files = _token_files(records)
    files["token_maps.npz"] = cli.npz_bytes(
        bits=bits,
        ids=ids,
        attention_mask=mask,
        targets=targets,
        predicted=predicted,
        total_bits=total,
        layer=np.str_(args.layer),
    )
    if args.html:
        files["token_maps.html"] = _token_page(records, tokens, bits)
    extra: dict[Path, Callable[[Path], None]] = {}
    if args.save_estimate is not None:
        extra[Path(args.save_estimate)] = cli._npz_writer(engine.estimator.state_dict())
    cli.write_outputs(out, files, extra)
    print(
        f"explained {len(ids)} texts at layer {args.layer}: mean {total.mean():.1f} bits per text; "
        f"wrote {len(files)} files to {out}"
    )
    return 0


def _check_text_options(args: argparse.Namespace) -> None:
    """The options of ``iba explain --texts`` that must be given, or not, together."""
    if args.images:
        raise UsageError("give either --images or --texts, not both")
    if args.tokenizer is None:
        raise UsageError("--texts needs --tokenizer module:factory (a callable returning the tokenizer)")
    from .cli import check_estimate_source

    check_estimate_source(args, "FILE.txt (texts like the ones to explain, one per line)")


def _token_bottleneck(
    args: argparse.Namespace, backend: Backend, model: Any, ids: np.ndarray, length: int
) -> tuple[Any, tuple[int, ...]]:
    """The engine at ``--layer`` and its per-text feature shape ``(C, T)``, checked to hold
    one position per token."""
    from ..engines import PerSampleBottleneck
    from . import cli

    try:
        engine = PerSampleBottleneck(
            backend,
            model,
            args.layer,
            layout=args.layout,
            beta=args.beta,
            optimization_steps=args.steps,
            # No smoothing along the tokens unless asked: neighbouring tokens are not
            # neighbouring pixels (the text demo measured it: docs/tutorials/sequences.md).
            sigma=cli.smoothing(args.sigma, default=None),
        )
        feature_shape = engine.feature_shape(_tensor(backend, model, ids[:1]))
    except LookupError as exc:
        raise UsageError(f"{cli._one_line(str(exc))} (see 'iba layers MODEL')") from None
    except (RuntimeError, TypeError, ValueError) as exc:
        raise UsageError(
            f"cannot put a bottleneck at layer {args.layer!r}: {cli._one_line(str(exc))}"
        ) from None
    if len(feature_shape) != 2:
        raise UsageError(
            f"layer {args.layer!r} gives features of shape {tuple(feature_shape)} per text, not a "
            "sequence (C, T); choose an embedding or encoder layer (see 'iba layers MODEL')"
        )
    if int(feature_shape[1]) != length:
        raise UsageError(
            f"layer {args.layer!r} has {feature_shape[1]} positions for {length} tokens; per-token "
            "maps need a layer with one position per token"
        )
    return engine, feature_shape


def _token_maps(
    args: argparse.Namespace,
    backend: Backend,
    model: Any,
    engine: Any,
    ids: np.ndarray,
    mask: np.ndarray,
    targets: np.ndarray,
) -> np.ndarray:
    """The per-token maps ``(N, T)`` in bits, ``--batch-size`` texts at a time; text ``k``
    draws its noise from stream ``seed + k``."""
    length = int(ids.shape[1])
    maps = []
    for i in range(0, len(ids), args.batch_size):
        sl = slice(i, i + args.batch_size)
        try:
            m = engine.analyze(
                _tensor(backend, model, ids[sl]),
                target=targets[sl],
                seed=args.seed + i,
                noise=args.noise,
                attention_mask=mask[sl],
            )
        except FloatingPointError as exc:
            raise RunFailure(str(exc)) from None
        maps.append(np.asarray(backend.to_numpy(m), dtype=np.float32).reshape(-1, length))
    return np.concatenate(maps)


def _token_files(records: list[dict[str, Any]]) -> dict[str, bytes]:
    """``token_maps.json`` (one record per text) and ``token_bits.csv`` (one row per token)."""
    files: dict[str, bytes] = {"token_maps.json": json.dumps(records, indent=1, ensure_ascii=False).encode()}
    table = io.StringIO()
    writer = csv.writer(table, lineterminator="\n")
    writer.writerow(["line", "position", "token", "bits"])
    for rec in records:
        for pos, (tok, b) in enumerate(zip(rec["tokens"], rec["bits"], strict=True)):
            writer.writerow([rec["line"], pos, tok, f"{b:.6f}"])
    files["token_bits.csv"] = table.getvalue().encode()
    return files


def _token_page(records: list[dict[str, Any]], tokens: list[list[str]], bits: np.ndarray) -> bytes:
    """``token_maps.html``: every text's tokens coloured by bits, captioned with its class."""
    from .tokens import token_map_html

    labels = [f"{r['line']}: class {r['target']} ({r['total_bits']:.1f} bits)" for r in records]
    page = (
        '<!DOCTYPE html>\n<html><head><meta charset="utf-8"><title>iba token maps</title></head>'
        f"<body>\n{token_map_html(tokens, bits, labels=labels)}\n</body></html>\n"
    )
    return page.encode()
