"""Seed example "Different Optimizer Types".

One TrainingArguments per optimizer name; the Trainer builds the optimizer when it is constructed.
``adamw_8bit`` needs bitsandbytes (it runs on CPU too); without it that entry is reported as
skipped with the install command instead of failing the whole example.

Run: python examples/04_optimizer_types.py
"""

from _common import OUT, build_classifier, build_train_dataset

from optsched import Trainer, TrainingArguments

model = build_classifier(num_labels=2)
train_dataset = build_train_dataset(64)

# Using different optimizers via TrainingArguments
configs = [
    # AdamW with PyTorch implementation
    TrainingArguments(
        output_dir=f"{OUT}/adamw",
        optim="adamw_torch",
        learning_rate=5e-5,
        weight_decay=0.01,
    ),

    # Adafactor (memory-efficient)
    TrainingArguments(
        output_dir=f"{OUT}/adafactor",
        optim="adafactor",
        learning_rate=5e-5,
    ),

    # 8-bit AdamW (bitsandbytes, very memory-efficient)
    TrainingArguments(
        output_dir=f"{OUT}/adamw-8bit",
        optim="adamw_8bit",
        learning_rate=5e-5,
        weight_decay=0.01,
    ),

    # SGD with momentum
    TrainingArguments(
        output_dir=f"{OUT}/sgd",
        optim="sgd",
        learning_rate=1e-3,
        adam_beta1=0.9,  # Used as momentum for SGD
    ),
]

# Each creates appropriate optimizer when Trainer initializes
for config in configs:
    try:
        trainer = Trainer(model=model, args=config, train_dataset=train_dataset)
    except ImportError as exc:  # only adamw_8bit has an optional dependency (bitsandbytes)
        print(f"Optimizer: skipped {config.optim!s}: {exc}")
        continue
    print(f"Optimizer: {trainer.optimizer.__class__.__name__}")
