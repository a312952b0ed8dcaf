"""GPT-2 language modelling: model, tokenizer, data preparation, shards and the task plug-in."""
