"""`MLPConfig` / `MLPForImageClassification`: Auto-class round trip, shapes, loss, and the max-norm constraint."""

import torch
from mnist_data import ImageTensorDataset
from transformers import AutoConfig, AutoModelForImageClassification, Trainer, TrainingArguments

from hf_distill import MaxNormCallback, MLPConfig, MLPForImageClassification


def tiny_config(**overrides) -> MLPConfig:
    return MLPConfig(**{"image_size": 6, "hidden_sizes": [12, 7], "num_labels": 4, **overrides})


def test_defaults_are_the_papers_mnist_teacher_shape():
    config = MLPConfig()
    assert (config.image_size, config.num_channels, config.num_labels) == (28, 1, 10)
    assert config.hidden_sizes == [1200, 1200]
    assert config.input_size == 784 and config.max_norm is None


def test_forward_accepts_image_and_flat_inputs_and_returns_the_label_loss():
    torch.manual_seed(0)
    model = MLPForImageClassification(tiny_config()).eval()
    images, labels = torch.rand(5, 1, 6, 6), torch.tensor([0, 1, 2, 3, 0])
    output = model(pixel_values=images, labels=labels)
    assert output.logits.shape == (5, 4)
    torch.testing.assert_close(output.loss, torch.nn.functional.cross_entropy(output.logits, labels))
    torch.testing.assert_close(model(pixel_values=images.flatten(1)).logits, output.logits)
    torch.testing.assert_close(model(pixel_values=images[:, 0]).logits, output.logits)
    assert model(pixel_values=images).loss is None


def test_parameter_count_of_the_papers_student():
    model = MLPForImageClassification(MLPConfig(hidden_sizes=[800, 800]))
    assert sum(p.numel() for p in model.parameters()) == 784 * 800 + 800 + 800 * 800 + 800 + 800 * 10 + 10


def test_save_and_load_with_auto_classes(tmp_path):
    torch.manual_seed(0)
    model = MLPForImageClassification(tiny_config(input_dropout=0.2, hidden_dropout=0.5, max_norm=3.5))
    model.save_pretrained(tmp_path)

    config = AutoConfig.from_pretrained(tmp_path)
    assert isinstance(config, MLPConfig) and config.model_type == "hf_distill_mlp"
    assert config.hidden_sizes == [12, 7]
    assert (config.input_dropout, config.hidden_dropout, config.max_norm) == (0.2, 0.5, 3.5)
    loaded = AutoModelForImageClassification.from_pretrained(tmp_path)
    assert isinstance(loaded, MLPForImageClassification)
    for (name, expected), (loaded_name, actual) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert name == loaded_name
        torch.testing.assert_close(actual, expected, rtol=0, atol=0)


def test_max_norm_projects_only_rows_outside_the_ball():
    torch.manual_seed(0)
    model = MLPForImageClassification(tiny_config(max_norm=1.0))
    first = model.mlp[2]  # Flatten, Dropout, then the first Linear
    with torch.no_grad():
        first.weight.mul_(10.0)
        first.weight[0] = 0.5 * first.weight[0] / first.weight[0].norm()  # one row well inside the ball
    inside_row = first.weight[0].clone()
    model.apply_max_norm_()
    for linear in [m for m in model.modules() if isinstance(m, torch.nn.Linear)]:
        assert linear.weight.norm(dim=1).max() <= 1.0 + 1e-6
    torch.testing.assert_close(first.weight[0], inside_row)
    torch.testing.assert_close(first.weight[1:].norm(dim=1), torch.ones(11))


def test_max_norm_off_is_a_no_op():
    model = MLPForImageClassification(tiny_config())
    with torch.no_grad():
        model.classifier.weight.mul_(100.0)
    before = model.classifier.weight.clone()
    model.apply_max_norm_()
    torch.testing.assert_close(model.classifier.weight, before, rtol=0, atol=0)


def test_max_norm_callback_holds_the_constraint_during_trainer_training(tmp_path):
    torch.manual_seed(0)
    dataset = ImageTensorDataset(torch.rand(64, 1, 6, 6), torch.randint(0, 4, (64,)))
    args = TrainingArguments(
        output_dir=str(tmp_path),
        num_train_epochs=2,
        learning_rate=1.0,
        optim="sgd",
        per_device_train_batch_size=16,
        report_to="none",
        save_strategy="no",
        use_cpu=True,
        disable_tqdm=True,
    )

    def trained_max_row_norm(max_norm, callbacks):
        torch.manual_seed(0)
        model = MLPForImageClassification(tiny_config(max_norm=max_norm))
        Trainer(model=model, args=args, train_dataset=dataset, callbacks=callbacks).train()
        return max(m.weight.norm(dim=1).max().item() for m in model.modules() if isinstance(m, torch.nn.Linear))

    # Training moves rows past half their unconstrained final norm; the callback, and only it, keeps them inside.
    bound = trained_max_row_norm(None, []) / 2
    assert trained_max_row_norm(bound, []) > bound
    assert trained_max_row_norm(bound, [MaxNormCallback()]) <= bound + 1e-6
