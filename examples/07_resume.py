"""Seed example "Resuming with Optimizer State".

Train 3 epochs saving every SAVE_STEPS steps, then resume from ``checkpoint-{SAVE_STEPS}`` with
``num_train_epochs=5``: the model, optimizer, scheduler and RNG states are restored and training
continues from that step to the end of the new, longer plan. The seed saves every 1000 steps; with a
tiny dataset (10 steps per epoch) this example saves every 10, so the same structure runs in seconds.

Run: python examples/07_resume.py
"""

from _common import OUT, build_classifier, build_train_dataset

from optsched import Trainer, TrainingArguments

SAVE_STEPS = 10  # the seed's 1000, scaled to a 30-step run
model = build_classifier(num_labels=2)
train_dataset = build_train_dataset(80)  # 10 batches of 8 per epoch

# Initial training
training_args = TrainingArguments(
    output_dir=f"{OUT}/checkpoints",
    save_strategy="steps",
    save_steps=SAVE_STEPS,
)

trainer = Trainer(model=model, args=training_args, train_dataset=train_dataset)
trainer.train()
print(f"Initial training: {trainer.state.global_step} steps")

# Resume from checkpoint - optimizer and scheduler states are restored
training_args_resume = TrainingArguments(
    output_dir=f"{OUT}/checkpoints",
    num_train_epochs=5,  # Continue for more epochs
)

trainer_resumed = Trainer(
    model=model,
    args=training_args_resume,
    train_dataset=train_dataset,
)

# Optimizer and scheduler are recreated, then state is loaded from checkpoint
trainer_resumed.train(resume_from_checkpoint=f"{OUT}/checkpoints/checkpoint-{SAVE_STEPS}")
print(f"Resumed from step {SAVE_STEPS}: now at step {trainer_resumed.state.global_step}")
