"""Bad files and paths fail with errors that name the file or the argument, the value and what is allowed."""

import pytest
from conftest import byte_tokenizer, tiny_model, tiny_trainer

from sentinel_lightning import GatedLanguageModel, LanguageModelingDataModule
from sentinel_lightning.cli import main


def text_data(tmp_path, train, **kwargs):
    return LanguageModelingDataModule(
        tokenizer=byte_tokenizer(), source="text", train_files=[str(train)], block_size=32, cache=False, **kwargs
    )


def test_a_binary_training_file_is_named(tmp_path):
    binary = tmp_path / "weights.bin"
    binary.write_bytes(bytes(range(256)) * 4)
    with pytest.raises(ValueError, match=r"train_files lists '.*weights.bin', which holds a NUL byte at offset 0"):
        text_data(tmp_path, binary)


def test_a_non_utf8_validation_file_is_named(tmp_path):
    train = tmp_path / "train.txt"
    train.write_text("plenty of text " * 100)
    latin = tmp_path / "latin1.txt"
    latin.write_bytes("caf\u00e9 cr\u00e8me ".encode("latin-1") * 50)
    message = r"val_files lists '.*latin1.txt', which is not UTF-8 text \(near byte offset 3"
    with pytest.raises(ValueError, match=message):
        text_data(tmp_path, train, val_files=[str(latin)])


def test_a_one_paragraph_training_file_without_validation_files_names_the_file_and_val_fraction(tmp_path):
    short = tmp_path / "short.txt"
    short.write_text("one short paragraph")
    data = text_data(tmp_path, short)
    with pytest.raises(ValueError, match=r"train split of train_files=\['.*short.txt'\] .*val_fraction=0.1.* has 19 "
                       r"tokens, fewer than one block of block_size=32"):
        data.setup()
    long = tmp_path / "long.txt"
    long.write_text("a single paragraph without blank lines " * 20)
    data = text_data(tmp_path, long)
    with pytest.raises(ValueError, match=r"validation split of val_fraction=0.1 of the documents of "
                       r"train_files=\['.*long.txt'\] has 0 tokens, fewer than one block"):
        data.setup()


def test_a_missing_local_model_path_says_it_does_not_exist(tmp_path):
    with pytest.raises(RuntimeError, match=r"model='/no/such/dir': it looks like a local path, but it does not exist"):
        GatedLanguageModel(model="/no/such/dir")
    with pytest.raises(RuntimeError, match=r"model='/no/such/dir': it looks like a local path"):
        main(["fit", "--model.model", "/no/such/dir", "--trainer.logger", "false"])


def test_a_truncated_safetensors_file_is_named_with_the_model(tmp_path):
    folder = tmp_path / "tiny"
    tiny_model("llama").save_pretrained(folder)
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(RuntimeError, match=rf"model='{folder}': {weights} cannot be read .* truncated"):
        GatedLanguageModel(model=str(folder))


@pytest.mark.parametrize(
    "content, message",
    [(b"", r"empty.ckpt' is an empty file \(0 bytes\)"), (b"PK\x03\x04 cut short", r"empty.ckpt' is not a readable")],
)
def test_export_names_an_empty_or_truncated_checkpoint(tmp_path, content, message):
    (tmp_path / "empty.ckpt").write_bytes(content)
    with pytest.raises(ValueError, match=message):
        main(["export", "--ckpt_path", str(tmp_path / "empty.ckpt"), "--output_dir", str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()


def test_a_truncated_real_checkpoint_is_named(tmp_path):
    module = GatedLanguageModel(tiny_model("llama"))
    trainer = tiny_trainer()
    trainer.strategy.connect(module)
    trainer.save_checkpoint(tmp_path / "whole.ckpt")
    (tmp_path / "cut.ckpt").write_bytes((tmp_path / "whole.ckpt").read_bytes()[:50_000])
    with pytest.raises(ValueError, match=r"cut.ckpt' is not a readable Lightning checkpoint .* truncated"):
        main(["export", "--ckpt_path", str(tmp_path / "cut.ckpt"), "--output_dir", str(tmp_path / "out")])
