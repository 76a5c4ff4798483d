"""Seed example "Custom Trainer with Manual Optimizer Creation".

A subclass overrides ``create_optimizer()`` (no arguments, sets ``self.optimizer``) to give the
``bert`` backbone a 10x lower learning rate than the classifier head, each split into decay / no
decay. The Trainer calls the override and uses ``self.optimizer``.

Run: python examples/02_custom_trainer.py
"""

import torch
from _common import OUT, build_classifier, build_train_dataset

from optsched import Trainer, TrainingArguments

model = build_classifier(num_labels=2)
train_dataset = build_train_dataset(64)


class CustomTrainer(Trainer):
    def create_optimizer(self):
        """Override to customize parameter grouping."""
        # Custom parameter grouping: different decay for different layers
        model = self.model
        no_decay = ["bias", "LayerNorm.weight", "LayerNorm.bias"]
        bert_params = ["bert" in n for n, _ in model.named_parameters()]  # noqa: F841 (kept from the seed)

        optimizer_grouped_parameters = [
            {
                "params": [p for n, p in model.named_parameters()
                           if "bert" in n and not any(nd in n for nd in no_decay)],
                "weight_decay": self.args.weight_decay,
                "lr": self.args.learning_rate * 0.1,  # Lower LR for BERT layers
            },
            {
                "params": [p for n, p in model.named_parameters()
                           if "bert" in n and any(nd in n for nd in no_decay)],
                "weight_decay": 0.0,
                "lr": self.args.learning_rate * 0.1,
            },
            {
                "params": [p for n, p in model.named_parameters()
                           if "bert" not in n and not any(nd in n for nd in no_decay)],
                "weight_decay": self.args.weight_decay,
                "lr": self.args.learning_rate,  # Higher LR for classifier
            },
            {
                "params": [p for n, p in model.named_parameters()
                           if "bert" not in n and any(nd in n for nd in no_decay)],
                "weight_decay": 0.0,
                "lr": self.args.learning_rate,
            },
        ]

        self.optimizer = torch.optim.AdamW(
            optimizer_grouped_parameters,
            betas=(self.args.adam_beta1, self.args.adam_beta2),
            eps=self.args.adam_epsilon,
        )


training_args = TrainingArguments(output_dir=f"{OUT}/custom-opt")
trainer = CustomTrainer(model=model, args=training_args, train_dataset=train_dataset)
trainer.train()

for i, group in enumerate(trainer.optimizer.param_groups):
    print(f"group {i}: {len(group['params'])} tensors, base lr {group['initial_lr']:g}, "
          f"weight decay {group['weight_decay']}")
