import pytest
import torch
from torch.utils.data import DataLoader

from gpt_core.classifier import (
    SpamDataset,
    add_classification_head,
    calc_accuracy,
    check_fits,
    classification_loss,
    classification_metrics,
    classify_logits,
    classify_text,
    metrics_from_confusion,
    set_trainable,
)
from gpt_core.config import get_preset
from gpt_core.errors import GptflowError
from gpt_core.model import GPTModel
from gpt_core.tokenizer import get_tokenizer

MIRROR = "/work/shared/data/mirror"
TEXTS = ["You won a free prize! Call now", "See you at lunch?", "Ok"]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("GPTFLOW_MIRROR", MIRROR)
        mp.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path_factory.mktemp("tiktoken")))
        yield get_tokenizer()


def classifier(**overrides):
    torch.manual_seed(0)
    return add_classification_head(GPTModel(get_preset("gpt-nano", **overrides)))


def trainable_names(model):
    return {name for name, p in model.named_parameters() if p.requires_grad}


def test_head_has_two_outputs_and_is_untied():
    model = classifier()
    assert model.out_head.out_features == 2 and model.out_head.bias is not None
    assert model.cfg.num_classes == 2 and not model.cfg.tie_weights
    assert model(torch.zeros(1, 5, dtype=torch.long)).shape == (1, 5, 2)
    assert model.tok_emb.weight.shape == (50257, 32)


def test_set_trainable_variants():
    model = classifier()
    all_names = {name for name, _ in model.named_parameters()}
    set_trainable(model, "last_block")
    assert trainable_names(model) == {
        name for name in all_names if name.startswith(("trf_blocks.1.", "final_norm.", "out_head."))}
    set_trainable(model, "head")
    assert trainable_names(model) == {"out_head.weight", "out_head.bias"}
    set_trainable(model, "all")
    assert trainable_names(model) == all_names
    with pytest.raises(GptflowError, match="last_block"):
        set_trainable(model, "first_block")


def test_dataset_pads_to_the_longest_text(tokenizer):
    data = SpamDataset(TEXTS, [1, 0, "ham"], tokenizer)
    longest = len(tokenizer.encode(TEXTS[0]))
    assert data.max_length == longest and len(data) == 3
    ids, label = data[2]
    assert ids.tolist() == tokenizer.encode("Ok") + [50256] * (longest - 1)
    assert label.item() == 0 and ids.dtype == label.dtype == torch.long


def test_dataset_truncates_to_max_length(tokenizer):
    data = SpamDataset(TEXTS, ["spam", "ham", "HAM"], tokenizer, max_length=3)
    assert data[0][0].tolist() == tokenizer.encode(TEXTS[0])[:3]
    assert [data[i][1].item() for i in range(3)] == [1, 0, 0]
    assert all(data[i][0].shape == (3,) for i in range(3))
    # Message text is data: the special token's spelling must not make tiktoken raise.
    assert len(SpamDataset(["a <|endoftext|> b"], [0], tokenizer)) == 1


def test_dataset_rejects_empty_texts_and_bad_labels(tokenizer):
    with pytest.raises(GptflowError, match="row 1: the text is empty"):
        SpamDataset(["hi", "  "], [0, 1], tokenizer)
    with pytest.raises(GptflowError, match="row 2: label 2"):
        SpamDataset(TEXTS, [0, 1, 2], tokenizer)
    with pytest.raises(GptflowError, match="row 0: label 'eggs'"):
        SpamDataset(TEXTS, ["eggs", 1, 0], tokenizer)


def test_padded_length_above_context_fails():
    check_fits(64, 64)
    with pytest.raises(GptflowError, match="padded length 120 exceeds the model's context of 64"):
        check_fits(120, 64)


def test_classify_text_is_deterministic(tokenizer):
    model = classifier(drop_rate=0.5)
    model.train()
    first = classify_text(model, tokenizer, TEXTS[0], max_length=12)
    assert model.training  # the caller's mode is restored
    model.eval()
    assert classify_text(model, tokenizer, TEXTS[0], max_length=12) == first
    model.train()
    assert classify_text(model, tokenizer, TEXTS[0], max_length=12) == first
    label, probability = first
    assert label in ("not spam", "spam") and 0.5 <= probability <= 1
    with pytest.raises(GptflowError, match="exceeds the model's context"):
        classify_text(model, tokenizer, TEXTS[0], max_length=65)


def test_classify_text_reads_the_last_padded_position(tokenizer):
    model = classifier().eval()
    ids = tokenizer.encode("Ok") + [50256] * 7
    logits = classify_logits(model, torch.tensor([ids]))
    label, probability = classify_text(model, tokenizer, "Ok", max_length=8)
    probs = torch.softmax(logits[0], dim=-1)
    assert (label, probability) == (("not spam", "spam")[int(probs.argmax())], probs.max().item())


def test_loss_accuracy_and_evaluate(tokenizer):
    model = classifier()
    data = SpamDataset(TEXTS * 2, [1, 0, 0] * 2, tokenizer)
    loader = DataLoader(data, batch_size=4)
    inputs, targets = next(iter(loader))
    assert classification_loss(model, inputs, targets).ndim == 0
    result = classification_metrics(model, loader)
    assert set(result) == {"loss", "accuracy", "precision", "recall", "f1", "confusion"}
    assert sum(map(sum, result["confusion"])) == 6 and len(result["confusion"]) == 2
    assert result["accuracy"] == pytest.approx(calc_accuracy(loader, model))
    assert calc_accuracy(loader, model, num_batches=1) == classification_metrics(model, loader, num_batches=1)["accuracy"]


def test_confusion_is_indexed_true_then_predicted(tokenizer):
    model = classifier()
    with torch.no_grad():  # a head that always says spam
        model.out_head.weight.zero_()
        model.out_head.bias.copy_(torch.tensor([0.0, 1.0]))
    loader = DataLoader(SpamDataset(TEXTS * 2, [1, 0, 0] * 2, tokenizer), batch_size=4)
    result = classification_metrics(model, loader)
    assert result["confusion"] == [[0, 4], [0, 2]]
    assert (result["precision"], result["recall"]) == (pytest.approx(2 / 6), 1.0)


def test_metrics_from_a_hand_made_confusion():
    # confusion[true][predicted]: 50 ham right, 10 ham flagged as spam, 5 spam missed, 35 caught.
    metrics = metrics_from_confusion([[50, 10], [5, 35]])
    assert metrics["accuracy"] == pytest.approx(85 / 100)
    assert metrics["precision"] == pytest.approx(35 / 45)
    assert metrics["recall"] == pytest.approx(35 / 40)
    assert metrics["f1"] == pytest.approx(2 * (35 / 45) * (35 / 40) / (35 / 45 + 35 / 40))
    assert metrics_from_confusion([[3, 0], [0, 0]])["f1"] == 0.0
