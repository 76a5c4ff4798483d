"""Seed example "Manually Creating Optimizer and Scheduler".

``create_optimizer()`` then ``create_scheduler(num_training_steps=...)`` called by hand, with the
seed's step arithmetic. A tiny GPT-2 built in code stands in for "gpt2". With warmup_steps=500 the
lr starts at 0 (the first warmup step), as in the seed.

Run: python examples/03_manual_creation.py
"""

from _common import OUT, build_causal_lm, build_lm_dataset

from optsched import Trainer, TrainingArguments

model = build_causal_lm()  # AutoModelForCausalLM.from_pretrained("gpt2")
train_dataset = build_lm_dataset(64)
training_args = TrainingArguments(
    output_dir=f"{OUT}/manual-opt",
    num_train_epochs=3,
    per_device_train_batch_size=8,
    learning_rate=5e-5,
    lr_scheduler_type="cosine",
    warmup_steps=500,
)

trainer = Trainer(model=model, args=training_args, train_dataset=train_dataset)

# Manually trigger optimizer creation (normally automatic)
trainer.create_optimizer()

# Calculate total training steps
total_steps = (
    len(train_dataset) //
    (training_args.per_device_train_batch_size * training_args.gradient_accumulation_steps)
) * training_args.num_train_epochs

# Manually trigger scheduler creation
trainer.create_scheduler(num_training_steps=total_steps)

print(f"Optimizer: {trainer.optimizer.__class__.__name__}")
print(f"Learning rate: {trainer.optimizer.param_groups[0]['lr']}")
print(f"Scheduler: {trainer.lr_scheduler.__class__.__name__}")
