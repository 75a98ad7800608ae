"""A fixed set of rollout prompts for the rollout tests and benchmarks: one image, text only,
system + two images, of different lengths (so padding, caches and image runs are exercised)."""

from __future__ import annotations

from prism_megatron.data.encode import encode_prompt
from prism_megatron.data.synthetic import render_grid


def grid_image(cells):
    """A synthetic-task grid image (``data.synthetic.render_grid``) from rows of colour names."""
    return render_grid(tuple(tuple(r) for r in cells))


def prompt_specs():
    """(messages, images): one image, text only, system + two images; different lengths."""
    a = grid_image([["red", "blue", "blank"], ["green", "green", "yellow"]])
    b = grid_image([["red", "blue"], ["green", "yellow"]])
    return [
        ([{"role": "user", "content": [{"type": "image"},
                                       {"type": "text", "text": "How many red cells?"}]}], [a]),
        ([{"role": "user", "content": "Hello! What is two plus three? Think step by step, "
                                      "then answer."}], []),
        ([{"role": "system", "content": "Answer briefly."},
          {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Compare"},
                                       {"type": "image"}]}], [b, a]),
    ]


def encoded_prompts(processor):
    """``[(Encoded, images)]`` built with the project's one prompt builder."""
    return [(encode_prompt(processor, m, imgs), imgs) for m, imgs in prompt_specs()]
