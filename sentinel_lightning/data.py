"""Language-modelling data: the embedded corpus, local text files or a hub dataset, packed into blocks.

Every source becomes a ``datasets.DatasetDict`` of documents (column ``text``) with ``train`` and ``validation``
splits; documents are tokenised, joined with the end-of-sequence token and cut into blocks of ``block_size``
tokens. The tokenised blocks are cached on disk, keyed by the source, the tokenizer and the block size.
"""

from __future__ import annotations

import codecs
import hashlib
import json
import math
import os
from collections.abc import Sequence
from typing import Any

import datasets
import lightning as L
import torch
from torch.utils.data import DataLoader, RandomSampler
from transformers import PreTrainedTokenizerBase

from sentinel_lightning.pretrained import load_tokenizer

EMBEDDED_CORPUS = "python_reference"
# The second embedded text: API documentation, where the Language Reference is grammar and semantics. Recipes are
# tuned on the first; the second tells whether what they keep holds on text they were not tuned on.
DOCSTRINGS_CORPUS = "python_docstrings"
# Standard-library modules written in Python (their docstrings are the source's own), importable everywhere.
DOCSTRING_MODULES = (
    "argparse", "ast", "base64", "bisect", "calendar", "cmd", "code", "collections", "colorsys", "configparser",
    "contextlib", "copy", "csv", "dataclasses", "decimal", "difflib", "dis", "email.message", "enum", "filecmp",
    "fileinput", "fnmatch", "fractions", "ftplib", "functools", "getopt", "gettext", "glob", "gzip", "heapq", "hmac",
    "html.parser", "http.client", "http.server", "imaplib", "inspect", "ipaddress", "json", "locale", "logging",
    "mailbox", "mimetypes", "netrc", "numbers", "operator", "optparse", "pathlib", "pickle", "pkgutil", "platform",
    "poplib", "pprint", "queue", "quopri", "random", "reprlib", "sched", "secrets", "selectors", "shlex", "shutil",
    "smtplib", "socketserver", "statistics", "string", "subprocess", "tarfile", "tempfile", "textwrap", "threading",
    "timeit", "tokenize", "trace", "traceback", "types", "typing", "unittest.case", "urllib.parse", "urllib.request",
    "uuid", "warnings", "wave", "weakref", "webbrowser", "zipfile",
)


def python_reference_corpus(val_fraction: float = 0.1) -> datasets.DatasetDict:
    """The Python Language Reference shipped with CPython (``pydoc_data.topics``), split by topic.

    A topic goes to validation when a stable hash of its name falls below ``val_fraction``, so the split is
    deterministic and the same on every machine and process.
    """
    from pydoc_data.topics import topics

    return _split_documents(dict(topics), val_fraction)


def _in_validation(name: str, val_fraction: float) -> bool:
    """Whether the document ``name`` is held out: a stable hash of the name, the same on every machine."""
    digest = int(hashlib.sha256(name.encode()).hexdigest()[:8], 16)
    return digest / 0xFFFFFFFF < val_fraction


def _split_documents(documents: dict[str, str], val_fraction: float) -> datasets.DatasetDict:
    """``{name: text}`` as splits ``train`` and ``validation`` (columns ``title``, ``text``) by ``_in_validation``."""
    splits = {"train": {"title": [], "text": []}, "validation": {"title": [], "text": []}}
    for name in sorted(documents):
        split = splits["validation" if _in_validation(name, val_fraction) else "train"]
        split["title"].append(name)
        split["text"].append(documents[name])
    return datasets.DatasetDict({key: datasets.Dataset.from_dict(value) for key, value in splits.items()})


def module_docstrings(module_name: str) -> str:
    """The docstrings of a module, its public classes and functions and the classes' public methods, in source
    order, each headed by the object's qualified name; objects imported from elsewhere are left out."""
    import importlib
    import inspect

    module = importlib.import_module(module_name)
    parts = [f"{module_name}\n\n{inspect.getdoc(module) or ''}".rstrip()]

    def own(obj) -> bool:
        return getattr(obj, "__module__", None) == module_name and (inspect.isclass(obj) or inspect.isfunction(obj))

    members = [obj for name, obj in vars(module).items() if not name.startswith("_") and own(obj)]
    for obj in members:
        children = [obj]
        if inspect.isclass(obj):
            children += [value for name, value in vars(obj).items() if not name.startswith("_")
                         and inspect.isfunction(value) and value.__doc__]
        for child in children:
            doc = inspect.getdoc(child)
            if doc:
                parts.append(f"{module_name}.{child.__qualname__}\n\n{doc}")
    return "\n\n".join(parts)


def python_docstrings_corpus(val_fraction: float = 0.1) -> datasets.DatasetDict:
    """The docstrings of ``DOCSTRING_MODULES`` (``module_docstrings``), one document per module, split by module
    name as ``python_reference_corpus`` splits topics. A module missing from this Python is left out."""
    documents = {}
    for name in DOCSTRING_MODULES:
        try:
            documents[name] = module_docstrings(name)
        except ImportError:  # a module this build of CPython leaves out (no _ssl, no _curses, ...)
            continue
    return _split_documents(documents, val_fraction)


EMBEDDED_SOURCES = {EMBEDDED_CORPUS: python_reference_corpus, DOCSTRINGS_CORPUS: python_docstrings_corpus}


def check_text_file(path: str, argument: str) -> None:
    """Raises a ``ValueError`` naming ``path`` (listed in ``argument``) when it is not UTF-8 text.

    A NUL byte marks a binary file (or UTF-16 text); any other byte sequence that is not UTF-8 is reported with
    its offset. The file is read in chunks of 1 MiB.
    """
    decoder = codecs.getincrementaldecoder("utf-8")()
    offset = 0
    with open(path, "rb") as file:
        while chunk := file.read(1 << 20):
            nul = chunk.find(b"\x00")
            if nul >= 0:
                raise ValueError(
                    f"{argument} lists {path!r}, which holds a NUL byte at offset {offset + nul}: it looks like a "
                    "binary file (or UTF-16 text); give UTF-8 text files."
                )
            try:
                decoder.decode(chunk)
            except UnicodeDecodeError as error:
                raise ValueError(
                    f"{argument} lists {path!r}, which is not UTF-8 text (near byte offset {offset + error.start}: "
                    f"{error.reason}); convert it to UTF-8 or leave it out."
                ) from None
            offset += len(chunk)
    try:
        decoder.decode(b"", final=True)
    except UnicodeDecodeError:
        raise ValueError(f"{argument} lists {path!r}, which ends in the middle of a UTF-8 character.") from None


def pack_into_blocks(token_lists: Sequence[Sequence[int]], block_size: int, separator: int | None) -> list[list[int]]:
    """Joins token lists (with ``separator`` after each) and cuts them into full blocks; the remainder is dropped."""
    stream: list[int] = []
    for tokens in token_lists:
        stream.extend(tokens)
        if separator is not None:
            stream.append(separator)
    return [stream[start : start + block_size] for start in range(0, len(stream) - block_size + 1, block_size)]


class EpochShuffledSampler(RandomSampler):
    """A random order that depends only on ``seed`` and the epoch, so a run resumed at an epoch end sees the same
    batches (``LanguageModelingDataModule`` refuses to resume inside an epoch, whose order would restart).

    Lightning calls ``set_epoch`` at the start of every epoch; under DDP it replaces this sampler (a
    ``RandomSampler``) with a ``DistributedSampler``, which is seeded by epoch in the same way.
    """

    def __init__(self, data_source, seed: int = 0) -> None:
        super().__init__(data_source, generator=torch.Generator().manual_seed(seed))
        self.seed = seed

    def set_epoch(self, epoch: int) -> None:
        self.generator = torch.Generator().manual_seed(self.seed + epoch)


class LanguageModelingDataModule(L.LightningDataModule):
    """Blocks of ``block_size`` tokens for causal-LM fine-tuning.

    Args:
        tokenizer: Model name or local path of the tokenizer, a tokenizer object, or None for the embedded
            default model's tokenizer.
        gguf_file: GGUF file inside ``tokenizer``'s folder, if the tokenizer comes from one.
        source: ``"python_reference"`` (the embedded corpus), ``"python_docstrings"`` (the standard library's
            docstrings, the second embedded text), ``"text"`` (``train_files``/``val_files``) or ``"hub"``
            (``dataset_name``/``dataset_config``).
        train_files: Local text files for training (``source="text"``).
        val_files: Local text files for validation; when empty, ``val_fraction`` of the training paragraphs.
        dataset_name: Hub dataset name (``source="hub"``).
        dataset_config: Hub dataset configuration.
        text_column: Column holding the text in a hub dataset.
        val_fraction: Share of the documents held out when the source has no validation split.
        block_size: Tokens per training sequence.
        batch_size: Sequences per batch.
        num_workers: DataLoader workers.
        seed: Seed of the training order (one shuffle per epoch, reproducible across resumes).
        cache: Whether to cache the tokenised blocks on disk.
        cache_dir: Where to cache them; None means ``sentinel_lightning`` in the ``datasets`` cache folder.
    """

    def __init__(
        self,
        tokenizer: str | PreTrainedTokenizerBase | None = None,
        gguf_file: str | None = None,
        source: str = EMBEDDED_CORPUS,
        train_files: list[str] | None = None,
        val_files: list[str] | None = None,
        dataset_name: str | None = None,
        dataset_config: str | None = None,
        text_column: str = "text",
        val_fraction: float = 0.1,
        block_size: int = 256,
        batch_size: int = 4,
        num_workers: int = 0,
        seed: int = 0,
        cache: bool = True,
        cache_dir: str | None = None,
    ) -> None:
        super().__init__()
        sources = (*EMBEDDED_SOURCES, "text", "hub")
        if source not in sources:
            raise ValueError(f"source={source!r} is not one of {sources}.")
        if source == "text" and not train_files:
            raise ValueError("source='text' needs train_files, a list of local text files; got none.")
        if source == "hub" and not dataset_name:
            raise ValueError("source='hub' needs dataset_name, the name of a dataset on the Hugging Face hub.")
        for name, files in (("train_files", train_files), ("val_files", val_files)):
            missing = [path for path in files or [] if not os.path.isfile(path)]
            if missing:
                raise FileNotFoundError(f"{name} lists files that do not exist: {missing}.")
            for path in files or []:
                check_text_file(path, name)
        if not 0.0 < val_fraction < 1.0:
            raise ValueError(f"val_fraction={val_fraction} must lie strictly between 0 and 1.")
        for name, value in (("block_size", block_size), ("batch_size", batch_size)):
            if value < 1:
                raise ValueError(f"{name}={value} must be a positive integer.")
        self.save_hyperparameters(ignore=["tokenizer"])
        self.tokenizer_source = tokenizer
        self._tokenizer: PreTrainedTokenizerBase | None = (
            None if tokenizer is None or isinstance(tokenizer, str) else tokenizer
        )
        self.blocks: dict[str, datasets.Dataset] = {}
        self._held_out = False  # whether the validation documents were held out of the training ones

    @property
    def tokenizer(self) -> PreTrainedTokenizerBase:
        if self._tokenizer is None:
            self._tokenizer = load_tokenizer(self.tokenizer_source, self.hparams.gguf_file)
        return self._tokenizer

    def documents(self) -> datasets.DatasetDict:
        """The source's documents, column ``text``, splits ``train`` and ``validation``."""
        hp = self.hparams
        if hp.source in EMBEDDED_SOURCES:
            return EMBEDDED_SOURCES[hp.source](hp.val_fraction)
        if hp.source == "text":
            requested = {"train": hp.train_files, "validation": hp.val_files or []}
            files = {split: [path for path in paths if os.path.getsize(path) > 0] for split, paths in requested.items()}
            loaded = datasets.DatasetDict()
            if files["train"] or files["validation"]:
                loaded = datasets.load_dataset(
                    "text", data_files={split: paths for split, paths in files.items() if paths}, sample_by="paragraph"
                )
            for split in ("train", "validation"):  # an empty file is an empty split, reported below
                if requested[split] and not files[split]:
                    loaded[split] = datasets.Dataset.from_dict({"text": []})
        else:
            loaded = datasets.load_dataset(hp.dataset_name, hp.dataset_config)
            if hp.text_column not in loaded["train"].column_names:
                raise ValueError(
                    f"text_column={hp.text_column!r} is not a column of {hp.dataset_name!r}; its columns are "
                    f"{loaded['train'].column_names}."
                )
            loaded = loaded.rename_column(hp.text_column, "text") if hp.text_column != "text" else loaded
        self._held_out = "validation" not in loaded
        if self._held_out:
            loaded = self._hold_out(loaded["train"])
        splits = ("train", "validation")
        return datasets.DatasetDict({split: loaded[split].select_columns(["text"]) for split in splits})

    def _hold_out(self, train: datasets.Dataset) -> datasets.DatasetDict:
        """Holds ``val_fraction`` of the training documents out for validation (none when there is only one)."""
        if len(train) < 2:  # too few to split: the split that is too short is reported with its origin
            return datasets.DatasetDict({"train": train, "validation": train.select([])})
        held_out = train.train_test_split(test_size=self.hparams.val_fraction, shuffle=True, seed=0)
        return datasets.DatasetDict({"train": held_out["train"], "validation": held_out["test"]})

    def _origin(self, split: str) -> str:
        """Where the documents of ``split`` come from, in the arguments' words, for error messages."""
        hp = self.hparams
        if hp.source == "text":
            use_val = split == "validation" and hp.val_files
            origin = f"val_files={hp.val_files}" if use_val else f"train_files={hp.train_files}"
        else:
            origin = f"dataset_name={hp.dataset_name!r}" if hp.source == "hub" else f"source={hp.source!r}"
        if not self._held_out:
            return origin
        if split == "validation":
            return f"val_fraction={hp.val_fraction} of the documents of {origin}"
        return f"{origin} (less the val_fraction={hp.val_fraction} of its documents held out for validation)"

    def _cache_path(self, documents: datasets.DatasetDict) -> str | None:
        if not self.hparams.cache:
            return None
        cache_dir = self.hparams.cache_dir or os.path.join(datasets.config.HF_DATASETS_CACHE, "sentinel_lightning")
        key = {
            "documents": {split: documents[split]._fingerprint for split in documents},
            "tokenizer": self.tokenizer.name_or_path,
            "vocab": len(self.tokenizer),
            "block_size": self.hparams.block_size,
            "version": 1,
        }
        if self.hparams.source in EMBEDDED_SOURCES:  # in-memory datasets: hash the text itself
            texts = [text for split in ("train", "validation") for text in documents[split]["text"]]
            key["documents"] = hashlib.sha256("\x00".join(texts).encode()).hexdigest()
        digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
        return os.path.join(cache_dir, digest)

    def _tokenize_and_pack(self) -> datasets.DatasetDict:
        documents = self.documents()
        cache_path = self._cache_path(documents)
        if cache_path is not None and os.path.isdir(cache_path):
            return datasets.load_from_disk(cache_path)
        tokenizer, block_size = self.tokenizer, self.hparams.block_size
        packed = {}
        for split in ("train", "validation"):
            texts = [text for text in documents[split]["text"] if text and text.strip()]
            token_lists = tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []
            num_tokens = sum(len(tokens) for tokens in token_lists)
            if num_tokens < block_size:
                raise ValueError(
                    f"The {split} split of {self._origin(split)} has {num_tokens} tokens, fewer than one block of "
                    f"block_size={block_size}: give it more text (documents of text files are paragraphs, separated "
                    "by blank lines), pass val_files or lower block_size."
                )
            blocks = pack_into_blocks(token_lists, block_size, tokenizer.eos_token_id)
            packed[split] = datasets.Dataset.from_dict({"input_ids": blocks})
        packed = datasets.DatasetDict(packed)
        if cache_path is not None:
            packed.save_to_disk(cache_path)
        return packed

    def prepare_data(self) -> None:
        """Tokenises once (on the first process of each node) so that ``setup`` finds the cache."""
        self._tokenize_and_pack()

    def setup(self, stage: str | None = None) -> None:
        if not self.blocks:
            packed = self._tokenize_and_pack()
            self.blocks = {split: packed[split].with_format("torch") for split in packed}

    @staticmethod
    def collate(examples: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        """Stacks blocks into ``input_ids``, ``attention_mask`` and ``labels``, each ``[batch, block_size]``."""
        input_ids = torch.stack([example["input_ids"] for example in examples])
        return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "labels": input_ids.clone()}

    def _loader(self, split: str, shuffle: bool) -> DataLoader:
        self.setup()
        blocks = self.blocks[split]
        return DataLoader(
            blocks,
            batch_size=self.hparams.batch_size,
            sampler=EpochShuffledSampler(blocks, self.hparams.seed) if shuffle else None,
            num_workers=self.hparams.num_workers,
            collate_fn=self.collate,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", shuffle=True)

    def state_dict(self) -> dict[str, Any]:
        """Where in its epoch the run is when a checkpoint is written: ``load_state_dict`` checks it on resume."""
        trainer = self.trainer
        if trainer is None or not math.isfinite(trainer.num_training_batches):
            return {}
        return {
            "epoch": trainer.current_epoch,
            "batches_into_epoch": trainer.fit_loop.epoch_loop.batch_progress.current.processed,
            "batches_per_epoch": int(trainer.num_training_batches),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Refuses to resume training from a checkpoint written inside an epoch.

        The epoch's order restarts from its first batch on resume (the loaders keep no position), so the resumed
        epoch would see other batches than the interrupted one. Validating or exporting such a checkpoint is fine.
        """
        trainer = self.trainer
        done, total = state_dict.get("batches_into_epoch", 0), state_dict.get("batches_per_epoch", 0)
        if trainer is None or trainer.state.fn != "fit" or not 0 < done < total:
            return
        raise ValueError(
            f"The checkpoint to resume from was written after {done} of the {total} training batches of epoch "
            f"{state_dict.get('epoch')} (a ModelCheckpoint with every_n_train_steps or train_time_interval?). "
            "LanguageModelingDataModule resumes only at epoch ends: the resumed epoch would start again from its "
            "first batch and train on other batches than the interrupted run. Resume from a checkpoint written at "
            "an epoch end (the job's last.ckpt), or save with ModelCheckpoint(every_n_epochs=1)."
        )

    def val_dataloader(self) -> DataLoader:
        return self._loader("validation", shuffle=False)
