import json
import math

import pytest
import torch
from conftest import byte_tokenizer, tiny_data, tiny_model, tiny_trainer

from sentinel_lightning import GatedLanguageModel, evaluation
from sentinel_lightning.cli import main
from sentinel_lightning.cli.evaluate import evaluate, load_for_evaluation, validation_loader
from sentinel_lightning.evaluation import measure_inference_speed, perplexity, text_quality

EOS = 256


def test_text_quality_exact_values():
    assert text_quality("the cat saw the dog") == {"lexical_diversity": 0.8, "repetition_score": 0.2, "num_words": 5}
    # Case and punctuation do not make words different.
    assert text_quality("Hello, hello! World.") == pytest.approx(
        {"lexical_diversity": 2 / 3, "repetition_score": 1 / 3, "num_words": 3}
    )
    assert text_quality("") == {"lexical_diversity": 0.0, "repetition_score": 0.0, "num_words": 0}
    assert text_quality("a b c a", window=2)["repetition_score"] == 0.0
    assert text_quality("a b c a", window=3)["repetition_score"] == 0.25
    # The default window is 50 words: a word 50 words later recurs, one 60 words later does not.
    fifty = " ".join(f"w{index}" for index in range(50))
    sixty = " ".join(f"w{index}" for index in range(60))
    assert text_quality(fifty + " w0")["repetition_score"] == pytest.approx(1 / 51)
    assert text_quality(sixty + " w0") == pytest.approx(
        {"lexical_diversity": 60 / 61, "repetition_score": 0.0, "num_words": 61}
    )
    with pytest.raises(ValueError, match="window=0"):
        text_quality("a", window=0)


def test_perplexity_is_exp_of_the_token_weighted_loss_without_padding():
    model = tiny_model("llama")
    torch.manual_seed(0)
    input_ids = torch.randint(3, 200, (2, 10))
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, 6:] = 0  # right padding: the second row has 6 tokens
    first = {"input_ids": input_ids, "attention_mask": attention_mask}
    labels = input_ids[:1, :4].clone()
    labels[0, 2] = -100  # the third token is not predicted
    second = {"input_ids": input_ids[:1, :4], "labels": labels}

    with torch.no_grad():
        logits = [model(input_ids=first["input_ids"]).logits, model(input_ids=second["input_ids"]).logits]
    nll, count = 0.0, 0
    # By hand: the next token of every position whose next token is real (not padding, not -100).
    for row, length in ((0, 10), (1, 6)):
        for position in range(length - 1):
            nll -= logits[0][row, position].log_softmax(-1)[input_ids[row, position + 1]].item()
            count += 1
    for position in (0, 2):  # predicting label 1 and label 3; label 2 is -100
        nll -= logits[1][0, position].log_softmax(-1)[input_ids[0, position + 1]].item()
        count += 1
    assert count == 9 + 5 + 2
    expected = math.exp(nll / count)

    assert perplexity(model, [first, second]) == pytest.approx(expected, rel=1e-5)
    assert perplexity(GatedLanguageModel(model), [first, second]) == pytest.approx(expected, rel=1e-5)
    assert perplexity(model, [first, second], max_batches=1) != pytest.approx(expected, rel=1e-5)
    with pytest.raises(ValueError, match="no token"):
        perplexity(model, [{"input_ids": input_ids, "labels": torch.full_like(input_ids, -100)}])


def test_inference_speed_generates_exactly_num_tokens_even_when_eos_is_likely():
    model = tiny_model("llama")
    # Make end-of-sequence the greedy choice everywhere: generation would stop after one token if allowed.
    model.lm_head.register_forward_hook(
        lambda module, args, output: output + 100.0 * (torch.arange(output.shape[-1]) == EOS)
    )
    lengths = []
    generate = model.generate

    def spy(*args, **kwargs):
        output = generate(*args, **kwargs)
        lengths.append(output.shape[1])
        return output

    model.generate = spy
    tokenizer = byte_tokenizer()
    prompt_length = len(tokenizer("abc")["input_ids"])
    result = measure_inference_speed(model, tokenizer, "abc", num_tokens=7, num_runs=2, warmup_tokens=3)
    assert lengths == [prompt_length + 3, prompt_length + 7, prompt_length + 7]  # warm-up, then two timed runs
    assert len(result["runs"]) == 2 and result["num_tokens"] == 7
    assert result["tokens_per_second"] == pytest.approx(sorted(result["runs"])[0] / 2 + sorted(result["runs"])[1] / 2)
    assert all(rate > 0 for rate in result["runs"])
    with pytest.raises(ValueError, match="num_tokens=0"):
        measure_inference_speed(model, tokenizer, "abc", num_tokens=0)


def test_evaluate_a_checkpoint_before_and_after_pruning(tmp_path, capsys):
    module = GatedLanguageModel(tiny_model("llama"), learning_rate=1e-3)
    data = tiny_data(block_size=32, batch_size=4)
    trainer = tiny_trainer(limit_train_batches=2, limit_val_batches=0)
    trainer.fit(module, data)
    data.setup()
    dense_perplexity = perplexity(module, data.val_dataloader(), max_batches=2)
    module.gates.prune([(0, 0), (1, 2)])
    pruned_perplexity = perplexity(module, data.val_dataloader(), max_batches=2)
    checkpoint = str(tmp_path / "pruned.ckpt")
    trainer.save_checkpoint(checkpoint)
    tokenizer_dir = str(tmp_path / "tokenizer")
    byte_tokenizer().save_pretrained(tokenizer_dir)

    results = evaluate(
        ckpt_path=checkpoint,
        tokenizer=tokenizer_dir,
        prompt="def f(x):",
        num_tokens=5,
        num_runs=1,
        block_size=32,
        batch_size=4,
        max_batches=2,
        cache=False,
    )
    assert list(results) == ["before", "after"]
    assert results["before"]["active_heads"] == 8 and results["after"]["active_heads"] == 6
    assert results["before"]["perplexity"] == pytest.approx(dense_perplexity, rel=1e-4)
    assert results["after"]["perplexity"] == pytest.approx(pruned_perplexity, rel=1e-4)
    for column in results.values():
        assert {"tokens_per_second", "lexical_diversity", "repetition_score", "text"} <= set(column)
    printed = capsys.readouterr().out
    assert "perplexity" in printed and "before" in printed and "after" in printed and "6/8" in printed


def test_evaluate_a_plain_model_has_one_column(tmp_path):
    folder = str(tmp_path / "model")
    model = tiny_model("gpt2")
    model.save_pretrained(folder)
    byte_tokenizer().save_pretrained(folder)
    output = tmp_path / "results.json"
    results = evaluate(
        model=folder,
        num_tokens=4,
        num_runs=1,
        block_size=32,
        max_batches=1,
        cache=False,
        print_table=False,
        output_file=str(output),
    )
    assert list(results) == ["model"]
    assert results["model"]["perplexity"] > 1.0 and "active_heads" not in results["model"]
    assert json.loads(output.read_text()) == results


def test_the_library_evaluation_returns_and_the_cli_prints(tmp_path, capsys):
    folder = str(tmp_path / "model")
    tiny_model("gpt2").save_pretrained(folder)
    byte_tokenizer().save_pretrained(folder)
    options = dict(model=folder, num_tokens=4, num_runs=1, block_size=32, max_batches=1, cache=False)
    model, tokenizer = load_for_evaluation(folder)  # the CLI loads the model and builds the data
    loader = validation_loader(tokenizer, None, block_size=32, batch_size=4, cache=False)
    capsys.readouterr()
    results = evaluation.evaluate(model, tokenizer, loader, num_tokens=4, num_runs=1, max_batches=1)
    assert list(results) == ["model"] and results["model"]["perplexity"] > 1.0
    assert capsys.readouterr().out == ""  # library modules never print
    assert not hasattr(evaluation, "print_results") and not hasattr(evaluation, "unwrap_model")

    main(["evaluate", *(f"--{name}={value}" for name, value in options.items())])
    printed = capsys.readouterr().out
    assert "Evaluation of" in printed and "perplexity" in printed and "model continuation" in printed


def test_evaluating_a_gated_model_before_its_pruning_leaves_its_gates_as_they_were():
    module = GatedLanguageModel(tiny_model("llama"))
    module.gates.prune([(0, 1), (1, 3)])
    state = {name: value.clone() for name, value in module.gates.state_dict().items()}
    data = tiny_data(block_size=32, batch_size=2)
    data.setup()
    results = evaluation.evaluate(module, byte_tokenizer(), data.val_dataloader(), num_tokens=2, num_runs=1,
                                  max_batches=1)
    assert results["before"]["active_heads"] == 8 and results["after"]["active_heads"] == 6
    assert results["before"]["perplexity"] != results["after"]["perplexity"]
    for name, value in module.gates.state_dict().items():
        torch.testing.assert_close(value, state[name], rtol=0, atol=0, equal_nan=True, msg=name)
