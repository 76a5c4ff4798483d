"""Seed example "Different Scheduler Types".

Four schedule set-ups through TrainingArguments. The seed prints only the name; the scheduler itself
is built when training starts (``create_scheduler(num_training_steps)``), so the loop here also builds
it for a 2000-step run and prints its lr at a few steps, to show the four shapes differ.

Run: python examples/05_scheduler_types.py
"""

from _common import OUT, build_classifier, build_train_dataset

from optsched import Trainer, TrainingArguments

model = build_classifier(num_labels=2)
train_dataset = build_train_dataset(64)
NUM_TRAINING_STEPS = 2000  # long enough for the seed's warmup_steps=1000

# Various scheduler configurations
scheduler_configs = [
    # Linear decay with warmup (default)
    TrainingArguments(
        output_dir=f"{OUT}/linear",
        lr_scheduler_type="linear",
        warmup_ratio=0.1,
    ),

    # Cosine annealing with warmup
    TrainingArguments(
        output_dir=f"{OUT}/cosine",
        lr_scheduler_type="cosine",
        warmup_steps=1000,
    ),

    # Constant with warmup
    TrainingArguments(
        output_dir=f"{OUT}/constant",
        lr_scheduler_type="constant_with_warmup",
        warmup_ratio=0.05,
    ),

    # Polynomial decay
    TrainingArguments(
        output_dir=f"{OUT}/polynomial",
        lr_scheduler_type="polynomial",
        warmup_steps=500,
        lr_scheduler_kwargs={"power": 2.0},
    ),
]

for config in scheduler_configs:
    trainer = Trainer(model=model, args=config, train_dataset=train_dataset)
    print(f"Scheduler: {config.lr_scheduler_type}")
    scheduler = trainer.create_scheduler(num_training_steps=NUM_TRAINING_STEPS)
    lrs = {step: scheduler.lr_at(step)[0] for step in (0, 100, 500, 1000, 1500, 2000)}
    print("  lr at step " + ", ".join(f"{step}: {lr:.3g}" for step, lr in lrs.items()))
