"""The tiny test recipe (shared by the tests and the torchrun worker)."""

from sala.train.recipe import parse_recipe


def tiny_recipe(**over):
    raw = {
        "name": "test_tiny",
        "teacher": "random-llama",
        "teacher_shape": {"vocab_size": 64, "hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 3,
                          "num_attention_heads": 4, "num_key_value_heads": 2},
        "layers": "0",
        "data": "synthetic",
        "data_options": {"n_docs": 48, "min_len": 8, "max_len": 40},
        "checkpoint_every": 100,
        "log_every": 100,
        "convert": {"sparse": {"kernel_size": 8, "kernel_stride": 4, "block_size": 16, "window_size": 16,
                               "topk": 1, "init_blocks": 1}},
        "stages": [
            {"name": "align", "kind": "align", "trainable": "lightning", "steps": 2, "seq_len": 32,
             "batch_size": 4, "lr": 1e-3},
            {"name": "distill", "kind": "distill", "trainable": "lightning+gates", "steps": 2, "seq_len": 32,
             "batch_size": 4, "lr": 1e-3, "schedule": "cosine", "final_lr": 1e-4},
            {"name": "lm", "kind": "lm", "steps": 2, "seq_len": 32, "batch_size": 4, "lr": 1e-3,
             "schedule": "exp", "final_lr": 1e-4},
        ],
    }
    raw.update(over)
    return parse_recipe(raw)
