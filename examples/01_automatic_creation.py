"""Seed example "Automatic Optimizer and Scheduler Creation".

The Trainer builds the optimizer (AdamW, two groups: decay / no decay) from TrainingArguments when it
is constructed; the scheduler (linear with 10% warmup) is built when training starts, once the number
of steps is known. A tiny BERT built in code stands in for "bert-base-uncased".

Run: python examples/01_automatic_creation.py   (OPTSCHED_EXAMPLES_DIR sets where it writes)
"""

from _common import OUT, build_classifier, build_train_dataset

from optsched import Trainer, TrainingArguments

model = build_classifier(num_labels=2)  # AutoModelForSequenceClassification.from_pretrained("bert-base-uncased", num_labels=2)
train_dataset = build_train_dataset(64)

# Configure optimizer and scheduler via TrainingArguments
training_args = TrainingArguments(
    output_dir=f"{OUT}/results",
    num_train_epochs=3,
    per_device_train_batch_size=16,
    learning_rate=5e-5,
    weight_decay=0.01,
    lr_scheduler_type="linear",
    warmup_ratio=0.1,
    optim="adamw_torch",  # Specify optimizer type
)

# Trainer automatically calls create_optimizer() and create_scheduler()
trainer = Trainer(
    model=model,
    args=training_args,
    train_dataset=train_dataset,
)

# Access the created optimizer and scheduler
print(f"Optimizer: {trainer.optimizer}")
print(f"Scheduler: {trainer.lr_scheduler}")

# Training uses these automatically
trainer.train()
print(f"Scheduler after train(): {trainer.lr_scheduler}")
