"""Seed example "Inspecting Parameter Groups".

The optimizer exists right after the Trainer is constructed, so its groups can be inspected before
training: weight decay on the weight matrices and embeddings, none on biases and LayerNorm.

Run: python examples/06_inspect_param_groups.py
"""

from _common import OUT, build_classifier, build_train_dataset

from optsched import Trainer, TrainingArguments

model = build_classifier(num_labels=2)  # AutoModelForSequenceClassification.from_pretrained("bert-base-uncased", num_labels=2)
train_dataset = build_train_dataset(64)
training_args = TrainingArguments(
    output_dir=f"{OUT}/inspect",
    learning_rate=5e-5,
    weight_decay=0.01,
)

trainer = Trainer(model=model, args=training_args, train_dataset=train_dataset)

# Inspect how parameters are grouped
for i, group in enumerate(trainer.optimizer.param_groups):
    print(f"\nParameter Group {i}:")
    print(f"  Learning Rate: {group['lr']}")
    print(f"  Weight Decay: {group['weight_decay']}")
    print(f"  Number of parameters: {len(group['params'])}")

    # Show sample parameter names (requires mapping back to named_parameters)
    param_ids = {id(p) for p in group['params']}
    sample_names = [name for name, p in model.named_parameters() if id(p) in param_ids][:3]
    print(f"  Sample parameters: {sample_names}")
