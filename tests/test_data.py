import pytest
import torch

from sentinel_lightning.data import (
    DOCSTRING_MODULES,
    LanguageModelingDataModule,
    module_docstrings,
    pack_into_blocks,
    python_docstrings_corpus,
    python_reference_corpus,
)


def test_embedded_corpus_is_split_by_topic_deterministically():
    from pydoc_data.topics import topics

    first, second = python_reference_corpus(), python_reference_corpus()
    train, validation = set(first["train"]["title"]), set(first["validation"]["title"])
    assert train and validation and not train & validation
    assert train | validation == set(topics)
    assert list(first["validation"]["title"]) == list(second["validation"]["title"])
    assert 0.03 < len(validation) / len(topics) < 0.25


def test_module_docstrings_hold_the_modules_own_objects_only():
    import textwrap

    text = module_docstrings("textwrap")
    assert text.startswith("textwrap\n\nText wrapping and filling.")
    assert f"textwrap.TextWrapper.wrap\n\n{textwrap.TextWrapper.wrap.__doc__.strip().splitlines()[0]}" in text
    assert "textwrap.dedent" in text
    assert "re.compile" not in text and "textwrap.re" not in text  # textwrap imports re: not its own
    assert "textwrap._" not in text  # private names left out


def test_docstrings_corpus_is_a_second_text_split_by_module(tokenizer):
    first, second = python_docstrings_corpus(), python_docstrings_corpus()
    train, validation = set(first["train"]["title"]), set(first["validation"]["title"])
    assert train and validation and not train & validation and train | validation <= set(DOCSTRING_MODULES)
    assert list(first["validation"]["text"]) == list(second["validation"]["text"])
    reference = "".join(python_reference_corpus()["train"]["text"])
    assert not any(text in reference for text in first["validation"]["text"])  # a text of its own
    data = LanguageModelingDataModule(tokenizer=tokenizer, source="python_docstrings", block_size=1024, cache=False)
    data.setup("validate")
    held_out = tokenizer.decode(data.blocks["validation"][0]["input_ids"])
    assert held_out in "".join(first["validation"]["text"])
    # 32 blocks of 1,024 bytes: 32 blocks of 256 tokens (the frontier's 8 batches) at up to 4 bytes per token
    assert len(data.blocks["validation"]) >= 32


def test_pack_into_blocks_joins_with_separator_and_drops_the_remainder():
    blocks = pack_into_blocks([[1, 2, 3], [4, 5], [6]], block_size=3, separator=0)
    assert blocks == [[1, 2, 3], [0, 4, 5], [0, 6, 0]]
    assert pack_into_blocks([[1, 2]], block_size=4, separator=None) == []


def test_embedded_corpus_blocks_and_batches(tokenizer):
    data = LanguageModelingDataModule(tokenizer=tokenizer, block_size=64, batch_size=3, cache=False)
    data.setup("fit")
    batch = next(iter(data.train_dataloader()))
    assert batch["input_ids"].shape == (3, 64) and batch["input_ids"].dtype == torch.long
    assert torch.equal(batch["labels"], batch["input_ids"]) and batch["attention_mask"].all()
    assert len(data.blocks["train"]) > 10 * len(data.blocks["validation"]) > 0
    text = tokenizer.decode(data.blocks["validation"][0]["input_ids"])
    assert text in "".join(python_reference_corpus()["validation"]["text"]).replace("\n", "\n")


def test_text_files_and_cache(tmp_path, tokenizer):
    train = tmp_path / "train.txt"
    train.write_text("\n\n".join(f"paragraph {i} " + "word " * 30 for i in range(40)))
    val = tmp_path / "val.txt"
    val.write_text("validation text " * 40)
    kwargs = dict(
        tokenizer=tokenizer, source="text", train_files=[str(train)], block_size=32, cache_dir=str(tmp_path / "cache")
    )
    data = LanguageModelingDataModule(val_files=[str(val)], **kwargs)
    data.setup()
    assert len(data.blocks["validation"]) == len("validation text " * 40) // 32
    assert len(list((tmp_path / "cache").iterdir())) == 1
    again = LanguageModelingDataModule(val_files=[str(val)], **kwargs)
    again.setup()  # read back from the cache
    assert torch.equal(again.blocks["train"][:]["input_ids"], data.blocks["train"][:]["input_ids"])
    held_out = LanguageModelingDataModule(**kwargs)  # no val_files: 10% of the paragraphs
    held_out.setup()
    assert 0 < len(held_out.blocks["validation"]) < len(held_out.blocks["train"])


def test_clear_errors_for_bad_input(tmp_path, tokenizer):
    with pytest.raises(ValueError, match=r"source='wiki'"):
        LanguageModelingDataModule(tokenizer=tokenizer, source="wiki")
    with pytest.raises(ValueError, match="needs train_files"):
        LanguageModelingDataModule(tokenizer=tokenizer, source="text")
    with pytest.raises(FileNotFoundError, match=r"missing\.txt"):
        LanguageModelingDataModule(tokenizer=tokenizer, source="text", train_files=[str(tmp_path / "missing.txt")])
    with pytest.raises(ValueError, match="block_size=0"):
        LanguageModelingDataModule(tokenizer=tokenizer, block_size=0)
    short = tmp_path / "short.txt"
    short.write_text("too short")
    data = LanguageModelingDataModule(
        tokenizer=tokenizer, source="text", train_files=[str(short)], val_files=[str(short)], block_size=64, cache=False
    )
    with pytest.raises(ValueError, match=r"train split .* has 9 tokens, fewer than one block of block_size=64"):
        data.setup()
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    data = LanguageModelingDataModule(
        tokenizer=tokenizer, source="text", train_files=[str(empty)], val_files=[str(short)], cache=False
    )
    with pytest.raises(ValueError, match="has 0 tokens"):
        data.setup()
