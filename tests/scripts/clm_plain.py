"""A run_clm-style script (the shape of transformers' examples/pytorch/language-modeling/run_clm.py, cut down to
its data path): tokenize json text files, concatenate and cut into blocks, train with the Trainer, evaluate."""

import argparse
from itertools import chain

from datasets import load_dataset
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    Trainer,
    TrainingArguments,
    default_data_collator,
    set_seed,
)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--train_file", required=True)
    parser.add_argument("--validation_file", required=True)
    parser.add_argument("--config_name", required=True)
    parser.add_argument("--tokenizer_name", required=True)
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--block_size", type=int, default=32)
    parser.add_argument("--max_steps", type=int, default=60)
    args = parser.parse_args()
    set_seed(0)

    data_files = {"train": args.train_file, "validation": args.validation_file}
    raw = load_dataset("json", data_files=data_files)
    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer_name)
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(args.config_name))
    column_names = raw["train"].column_names
    tokenized = raw.map(lambda batch: tokenizer(batch["text"]), batched=True, remove_columns=column_names)

    def group_texts(examples):
        concatenated = {k: list(chain(*examples[k])) for k in examples.keys()}
        total_length = len(concatenated["input_ids"]) // args.block_size * args.block_size
        result = {
            k: [t[i : i + args.block_size] for i in range(0, total_length, args.block_size)]
            for k, t in concatenated.items()
        }
        result["labels"] = result["input_ids"].copy()
        return result

    lm_datasets = tokenized.map(group_texts, batched=True)
    training_args = TrainingArguments(
        output_dir=args.output_dir, max_steps=args.max_steps, per_device_train_batch_size=6, learning_rate=3e-3,
        logging_steps=20, save_strategy="no", report_to=[], use_cpu=True, disable_tqdm=True,
    )
    trainer = Trainer(
        model=model, args=training_args, train_dataset=lm_datasets["train"],
        eval_dataset=lm_datasets["validation"], data_collator=default_data_collator,
    )
    trainer.train()
    trainer.save_model()
    trainer.save_metrics("eval", trainer.evaluate())


if __name__ == "__main__":
    main()
