"""Hand-written ComfyUI graphs, API format and UI format, covering the core node set.

The UI-format graphs are written as the editor saves them: positional `widgets_values` (with the
seed's extra "control after generate" value), a links table `[id, src, src_slot, dst, dst_slot,
type]`, and editor-only nodes (Reroute, PrimitiveNode, Note) plus a muted and a bypassed node.
They use the names of the bundled models, which the tests provide as tiny random models.
"""

from __future__ import annotations

from typing import Any

TXT2IMG = "ldmgraph-shapes-txt2img.safetensors"
INPAINT = "ldmgraph-shapes-inpaint.safetensors"
STEPS = 2

# --- API format ---------------------------------------------------------------------------------

API_TXT2IMG: dict[str, Any] = {
    "4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": TXT2IMG}},
    "10": {"class_type": "CLIPSetLastLayer", "inputs": {"clip": ["4", 1], "stop_at_clip_layer": -2}},
    "6": {"class_type": "CLIPTextEncode", "inputs": {"text": "a red circle on the left", "clip": ["10", 0]}},
    "7": {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": ["10", 0]}},
    "5": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
    "3": {
        "class_type": "KSampler",
        "inputs": {
            "seed": 42,
            "steps": STEPS,
            "cfg": 4.0,
            "sampler_name": "euler",
            "scheduler": "karras",
            "denoise": 1.0,
            "model": ["4", 0],
            "positive": ["6", 0],
            "negative": ["7", 0],
            "latent_image": ["5", 0],
        },
    },
    "8": {"class_type": "VAEDecode", "inputs": {"samples": ["3", 0], "vae": ["4", 2]}},
    "9": {"class_type": "SaveImage", "inputs": {"filename_prefix": "comfy_txt2img", "images": ["8", 0]}},
    "11": {"class_type": "PreviewImage", "inputs": {"images": ["8", 0]}},
}

API_IMG2IMG: dict[str, Any] = {
    "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": TXT2IMG}},
    "2": {"class_type": "VAELoader", "inputs": {"vae_name": TXT2IMG}},
    "3": {"class_type": "LoadImage", "inputs": {"image": "shapes.png", "upload": "image"}},
    "4": {
        "class_type": "ImageScale",
        "inputs": {
            "image": ["3", 0],
            "upscale_method": "nearest-exact",
            "width": 48,
            "height": 48,
            "crop": "disabled",
        },
    },
    "5": {"class_type": "VAEEncode", "inputs": {"pixels": ["4", 0], "vae": ["2", 0]}},
    "6": {
        "class_type": "LatentUpscaleBy",
        "inputs": {"samples": ["5", 0], "upscale_method": "bilinear", "scale_by": 2.0},
    },
    "7": {"class_type": "CLIPTextEncode", "inputs": {"text": "a green circle on the left", "clip": ["1", 1]}},
    "8": {"class_type": "CLIPTextEncode", "inputs": {"text": "a blue square on the right", "clip": ["1", 1]}},
    "9": {
        "class_type": "ConditioningAverage",
        "inputs": {
            "conditioning_to": ["7", 0],
            "conditioning_from": ["8", 0],
            "conditioning_to_strength": 0.7,
        },
    },
    "10": {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": ["1", 1]}},
    "11": {
        "class_type": "KSampler",
        "inputs": {
            "seed": 5,
            "steps": STEPS,
            "cfg": 3.0,
            "sampler_name": "dpmpp_2m",
            "scheduler": "normal",
            "denoise": 0.6,
            "model": ["1", 0],
            "positive": ["9", 0],
            "negative": ["10", 0],
            "latent_image": ["6", 0],
        },
    },
    "12": {"class_type": "VAEDecode", "inputs": {"samples": ["11", 0], "vae": ["2", 0]}},
    "13": {"class_type": "SaveImage", "inputs": {"filename_prefix": "comfy_img2img", "images": ["12", 0]}},
}

API_INPAINT: dict[str, Any] = {
    "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": INPAINT}},
    "2": {"class_type": "LoadImage", "inputs": {"image": "shapes_alpha_hole.png", "upload": "image"}},
    "3": {
        "class_type": "CLIPTextEncode",
        "inputs": {"text": "a yellow triangle in the centre", "clip": ["1", 1]},
    },
    "4": {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": ["1", 1]}},
    "5": {
        "class_type": "InpaintModelConditioning",
        "inputs": {
            "positive": ["3", 0],
            "negative": ["4", 0],
            "vae": ["1", 2],
            "pixels": ["2", 0],
            "mask": ["2", 1],
            "noise_mask": True,
        },
    },
    "6": {
        "class_type": "KSampler",
        "inputs": {
            "seed": 9,
            "steps": STEPS,
            "cfg": 4.0,
            "sampler_name": "euler",
            "scheduler": "normal",
            "denoise": 1.0,
            "model": ["1", 0],
            "positive": ["5", 0],
            "negative": ["5", 1],
            "latent_image": ["5", 2],
        },
    },
    "7": {"class_type": "VAEDecode", "inputs": {"samples": ["6", 0], "vae": ["1", 2]}},
    "8": {"class_type": "SaveImage", "inputs": {"filename_prefix": "comfy_inpaint", "images": ["7", 0]}},
}

API_INPAINT_PLAIN_MODEL: dict[str, Any] = {
    "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": TXT2IMG}},
    "2": {"class_type": "LoadImage", "inputs": {"image": "shapes_alpha_hole.png", "upload": "image"}},
    "3": {
        "class_type": "CLIPTextEncode",
        "inputs": {"text": "a yellow triangle in the centre", "clip": ["1", 1]},
    },
    "4": {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": ["1", 1]}},
    "5": {
        "class_type": "VAEEncodeForInpaint",
        "inputs": {"pixels": ["2", 0], "vae": ["1", 2], "mask": ["2", 1], "grow_mask_by": 6},
    },
    "6": {"class_type": "VAEEncode", "inputs": {"pixels": ["2", 0], "vae": ["1", 2]}},
    "7": {"class_type": "SetLatentNoiseMask", "inputs": {"samples": ["6", 0], "mask": ["2", 1]}},
    "8": {
        "class_type": "KSampler",
        "inputs": {
            "seed": 1,
            "steps": STEPS,
            "cfg": 4.0,
            "sampler_name": "euler",
            "scheduler": "normal",
            "denoise": 1.0,
            "model": ["1", 0],
            "positive": ["3", 0],
            "negative": ["4", 0],
            "latent_image": ["5", 0],
        },
    },
    "9": {
        "class_type": "KSampler",
        "inputs": {
            "seed": 1,
            "steps": STEPS,
            "cfg": 4.0,
            "sampler_name": "euler",
            "scheduler": "normal",
            "denoise": 0.7,
            "model": ["1", 0],
            "positive": ["3", 0],
            "negative": ["4", 0],
            "latent_image": ["7", 0],
        },
    },
    "10": {"class_type": "VAEDecode", "inputs": {"samples": ["8", 0], "vae": ["1", 2]}},
    "11": {"class_type": "VAEDecode", "inputs": {"samples": ["9", 0], "vae": ["1", 2]}},
    "12": {
        "class_type": "SaveImage",
        "inputs": {"filename_prefix": "comfy_inpaint_vae", "images": ["10", 0]},
    },
    "13": {
        "class_type": "SaveImage",
        "inputs": {"filename_prefix": "comfy_inpaint_mask", "images": ["11", 0]},
    },
}

API_HIRES_FIX: dict[str, Any] = {
    "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": TXT2IMG}},
    "2": {"class_type": "CLIPTextEncode", "inputs": {"text": "a blue square at the top", "clip": ["1", 1]}},
    "3": {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": ["1", 1]}},
    "4": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
    "5": {
        "class_type": "KSamplerAdvanced",
        "inputs": {
            "add_noise": "enable",
            "noise_seed": 3,
            "steps": STEPS,
            "cfg": 4.0,
            "sampler_name": "euler",
            "scheduler": "normal",
            "start_at_step": 0,
            "end_at_step": 10000,
            "return_with_leftover_noise": "disable",
            "model": ["1", 0],
            "positive": ["2", 0],
            "negative": ["3", 0],
            "latent_image": ["4", 0],
        },
    },
    "6": {
        "class_type": "LatentUpscale",
        "inputs": {
            "samples": ["5", 0],
            "upscale_method": "nearest-exact",
            "width": 96,
            "height": 96,
            "crop": "disabled",
        },
    },
    "7": {
        "class_type": "KSampler",
        "inputs": {
            "seed": 3,
            "steps": STEPS,
            "cfg": 4.0,
            "sampler_name": "euler",
            "scheduler": "normal",
            "denoise": 0.5,
            "model": ["1", 0],
            "positive": ["2", 0],
            "negative": ["3", 0],
            "latent_image": ["6", 0],
        },
    },
    "8": {"class_type": "VAEDecode", "inputs": {"samples": ["7", 0], "vae": ["1", 2]}},
    "9": {"class_type": "SaveImage", "inputs": {"filename_prefix": "comfy_hires", "images": ["8", 0]}},
}

API_AREA_COMPOSITION: dict[str, Any] = {
    "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": TXT2IMG}},
    "2": {"class_type": "CLIPTextEncode", "inputs": {"text": "a grey background", "clip": ["1", 1]}},
    "3": {"class_type": "CLIPTextEncode", "inputs": {"text": "flat colours", "clip": ["1", 1]}},
    "4": {
        "class_type": "ConditioningConcat",
        "inputs": {"conditioning_to": ["2", 0], "conditioning_from": ["3", 0]},
    },
    "5": {"class_type": "CLIPTextEncode", "inputs": {"text": "a red circle in the centre", "clip": ["1", 1]}},
    "6": {
        "class_type": "ConditioningSetArea",
        "inputs": {"conditioning": ["5", 0], "width": 64, "height": 64, "x": 0, "y": 0, "strength": 1.0},
    },
    "7": {
        "class_type": "CLIPTextEncode",
        "inputs": {"text": "a blue square in the centre", "clip": ["1", 1]},
    },
    "8": {
        "class_type": "ConditioningSetArea",
        "inputs": {"conditioning": ["7", 0], "width": 64, "height": 64, "x": 64, "y": 0, "strength": 1.0},
    },
    "9": {
        "class_type": "ConditioningCombine",
        "inputs": {"conditioning_1": ["6", 0], "conditioning_2": ["8", 0]},
    },
    "10": {
        "class_type": "ConditioningCombine",
        "inputs": {"conditioning_1": ["9", 0], "conditioning_2": ["4", 0]},
    },
    "11": {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": ["1", 1]}},
    "12": {"class_type": "EmptyLatentImage", "inputs": {"width": 128, "height": 64, "batch_size": 1}},
    "13": {
        "class_type": "KSampler",
        "inputs": {
            "seed": 8,
            "steps": STEPS,
            "cfg": 4.0,
            "sampler_name": "euler",
            "scheduler": "normal",
            "denoise": 1.0,
            "model": ["1", 0],
            "positive": ["10", 0],
            "negative": ["11", 0],
            "latent_image": ["12", 0],
        },
    },
    "14": {"class_type": "VAEDecode", "inputs": {"samples": ["13", 0], "vae": ["1", 2]}},
    "15": {"class_type": "SaveImage", "inputs": {"filename_prefix": "comfy_area", "images": ["14", 0]}},
}

# --- UI format ----------------------------------------------------------------------------------


def _slot(name: str, kind: str, link: int | None = None, widget: bool = False) -> dict[str, Any]:
    slot: dict[str, Any] = {"name": name, "type": kind, "link": link}
    if widget:
        slot["widget"] = {"name": name}
    return slot


def _out(name: str, kind: str, links: list[int]) -> dict[str, Any]:
    return {"name": name, "type": kind, "links": links, "slot_index": 0}


def _node(node_id: int, kind: str, widgets: list[Any], inputs: list, outputs: list, mode: int = 0) -> dict:
    return {
        "id": node_id,
        "type": kind,
        "pos": [node_id * 50, 100],
        "size": [300, 100],
        "flags": {},
        "order": node_id,
        "mode": mode,
        "inputs": inputs,
        "outputs": outputs,
        "properties": {},
        "widgets_values": widgets,
    }


UI_TXT2IMG: dict[str, Any] = {
    "last_node_id": 15,
    "last_link_id": 20,
    "version": 0.4,
    "groups": [],
    "config": {},
    "extra": {},
    "nodes": [
        _node(
            4,
            "CheckpointLoaderSimple",
            [TXT2IMG],
            [],
            [_out("MODEL", "MODEL", [1]), _out("CLIP", "CLIP", [2]), _out("VAE", "VAE", [7])],
        ),
        _node(10, "CLIPSetLastLayer", [-2], [_slot("clip", "CLIP", 2)], [_out("CLIP", "CLIP", [3, 4])]),
        _node(
            6,
            "CLIPTextEncode",
            ["a red circle on the left"],
            [_slot("clip", "CLIP", 3)],
            [_out("CONDITIONING", "CONDITIONING", [5])],
        ),
        _node(
            7, "CLIPTextEncode", [""], [_slot("clip", "CLIP", 4)], [_out("CONDITIONING", "CONDITIONING", [6])]
        ),
        _node(5, "EmptyLatentImage", [64, 64, 1], [], [_out("LATENT", "LATENT", [10])]),
        # bypassed: its LATENT input passes through to the sampler unchanged
        _node(
            13,
            "LatentUpscaleBy",
            ["bilinear", 2.0],
            [_slot("samples", "LATENT", 10)],
            [_out("LATENT", "LATENT", [11])],
            mode=4,
        ),
        _node(12, "PrimitiveNode", [42, "fixed"], [], [_out("INT", "INT", [12])]),
        _node(
            3,
            "KSampler",
            [0, "randomize", STEPS, 4.0, "euler", "karras", 1.0],
            [
                _slot("model", "MODEL", 1),
                _slot("positive", "CONDITIONING", 5),
                _slot("negative", "CONDITIONING", 6),
                _slot("latent_image", "LATENT", 11),
                _slot("seed", "INT", 12, widget=True),
            ],
            [_out("LATENT", "LATENT", [8])],
        ),
        _node(14, "Reroute", [], [_slot("", "*", 7)], [_out("", "VAE", [9])]),
        _node(
            8,
            "VAEDecode",
            [],
            [_slot("samples", "LATENT", 8), _slot("vae", "VAE", 9)],
            [_out("IMAGE", "IMAGE", [13, 14])],
        ),
        _node(9, "SaveImage", ["comfy_txt2img"], [_slot("images", "IMAGE", 13)], []),
        _node(11, "PreviewImage", [], [_slot("images", "IMAGE", 14)], [], mode=2),  # muted
        _node(15, "Note", ["Seed comes from the primitive; the preview is muted."], [], []),
    ],
    "links": [
        [1, 4, 0, 3, 0, "MODEL"],
        [2, 4, 1, 10, 0, "CLIP"],
        [3, 10, 0, 6, 0, "CLIP"],
        [4, 10, 0, 7, 0, "CLIP"],
        [5, 6, 0, 3, 1, "CONDITIONING"],
        [6, 7, 0, 3, 2, "CONDITIONING"],
        [7, 4, 2, 14, 0, "VAE"],
        [8, 3, 0, 8, 0, "LATENT"],
        [9, 14, 0, 8, 1, "VAE"],
        [10, 5, 0, 13, 0, "LATENT"],
        [11, 13, 0, 3, 3, "LATENT"],
        [12, 12, 0, 3, 4, "INT"],
        [13, 8, 0, 9, 0, "IMAGE"],
        [14, 8, 0, 11, 0, "IMAGE"],
    ],
}

UI_INPAINT: dict[str, Any] = {
    "last_node_id": 8,
    "last_link_id": 12,
    "version": 0.4,
    "nodes": [
        _node(
            1,
            "CheckpointLoaderSimple",
            [INPAINT],
            [],
            [_out("MODEL", "MODEL", [1]), _out("CLIP", "CLIP", [2, 3]), _out("VAE", "VAE", [4, 5])],
        ),
        _node(
            2,
            "LoadImage",
            ["shapes_alpha_hole.png", "image"],
            [],
            [_out("IMAGE", "IMAGE", [6]), _out("MASK", "MASK", [7])],
        ),
        _node(
            3,
            "CLIPTextEncode",
            ["a yellow triangle in the centre"],
            [_slot("clip", "CLIP", 2)],
            [_out("CONDITIONING", "CONDITIONING", [8])],
        ),
        _node(
            4, "CLIPTextEncode", [""], [_slot("clip", "CLIP", 3)], [_out("CONDITIONING", "CONDITIONING", [9])]
        ),
        _node(
            5,
            "InpaintModelConditioning",
            [True],
            [
                _slot("positive", "CONDITIONING", 8),
                _slot("negative", "CONDITIONING", 9),
                _slot("vae", "VAE", 4),
                _slot("pixels", "IMAGE", 6),
                _slot("mask", "MASK", 7),
            ],
            [
                _out("positive", "CONDITIONING", [10]),
                _out("negative", "CONDITIONING", [11]),
                _out("latent", "LATENT", [12]),
            ],
        ),
        _node(
            6,
            "KSampler",
            [9, "fixed", STEPS, 4.0, "euler", "normal", 1.0],
            [
                _slot("model", "MODEL", 1),
                _slot("positive", "CONDITIONING", 10),
                _slot("negative", "CONDITIONING", 11),
                _slot("latent_image", "LATENT", 12),
            ],
            [_out("LATENT", "LATENT", [13])],
        ),
        _node(
            7,
            "VAEDecode",
            [],
            [_slot("samples", "LATENT", 13), _slot("vae", "VAE", 5)],
            [_out("IMAGE", "IMAGE", [14])],
        ),
        _node(8, "SaveImage", ["comfy_inpaint"], [_slot("images", "IMAGE", 14)], []),
    ],
    "links": [
        [1, 1, 0, 6, 0, "MODEL"],
        [2, 1, 1, 3, 0, "CLIP"],
        [3, 1, 1, 4, 0, "CLIP"],
        [4, 1, 2, 5, 2, "VAE"],
        [5, 1, 2, 7, 1, "VAE"],
        [6, 2, 0, 5, 3, "IMAGE"],
        [7, 2, 1, 5, 4, "MASK"],
        [8, 3, 0, 5, 0, "CONDITIONING"],
        [9, 4, 0, 5, 1, "CONDITIONING"],
        [10, 5, 0, 6, 1, "CONDITIONING"],
        [11, 5, 1, 6, 2, "CONDITIONING"],
        [12, 5, 2, 6, 3, "LATENT"],
        [13, 6, 0, 7, 0, "LATENT"],
        [14, 7, 0, 8, 0, "IMAGE"],
    ],
}

UI_HIRES_FIX: dict[str, Any] = {
    "last_node_id": 9,
    "last_link_id": 14,
    "version": 0.4,
    "nodes": [
        _node(
            1,
            "CheckpointLoaderSimple",
            [TXT2IMG],
            [],
            [_out("MODEL", "MODEL", [1, 2]), _out("CLIP", "CLIP", [3, 4]), _out("VAE", "VAE", [5])],
        ),
        _node(
            2,
            "CLIPTextEncode",
            ["a blue square at the top"],
            [_slot("clip", "CLIP", 3)],
            [_out("CONDITIONING", "CONDITIONING", [6, 7])],
        ),
        _node(
            3,
            "CLIPTextEncode",
            [""],
            [_slot("clip", "CLIP", 4)],
            [_out("CONDITIONING", "CONDITIONING", [8, 9])],
        ),
        _node(4, "EmptyLatentImage", [64, 64, 1], [], [_out("LATENT", "LATENT", [10])]),
        _node(
            5,
            "KSamplerAdvanced",
            ["enable", 3, "increment", STEPS, 4.0, "euler", "normal", 0, 10000, "disable"],
            [
                _slot("model", "MODEL", 1),
                _slot("positive", "CONDITIONING", 6),
                _slot("negative", "CONDITIONING", 8),
                _slot("latent_image", "LATENT", 10),
            ],
            [_out("LATENT", "LATENT", [11])],
        ),
        _node(
            6,
            "LatentUpscale",
            ["nearest-exact", 96, 96, "disabled"],
            [_slot("samples", "LATENT", 11)],
            [_out("LATENT", "LATENT", [12])],
        ),
        _node(
            7,
            "KSampler",
            [3, "fixed", STEPS, 4.0, "euler", "normal", 0.5],
            [
                _slot("model", "MODEL", 2),
                _slot("positive", "CONDITIONING", 7),
                _slot("negative", "CONDITIONING", 9),
                _slot("latent_image", "LATENT", 12),
            ],
            [_out("LATENT", "LATENT", [13])],
        ),
        _node(
            8,
            "VAEDecode",
            [],
            [_slot("samples", "LATENT", 13), _slot("vae", "VAE", 5)],
            [_out("IMAGE", "IMAGE", [14])],
        ),
        _node(9, "SaveImage", ["comfy_hires"], [_slot("images", "IMAGE", 14)], []),
    ],
    "links": [
        [1, 1, 0, 5, 0, "MODEL"],
        [2, 1, 0, 7, 0, "MODEL"],
        [3, 1, 1, 2, 0, "CLIP"],
        [4, 1, 1, 3, 0, "CLIP"],
        [5, 1, 2, 8, 1, "VAE"],
        [6, 2, 0, 5, 1, "CONDITIONING"],
        [7, 2, 0, 7, 1, "CONDITIONING"],
        [8, 3, 0, 5, 2, "CONDITIONING"],
        [9, 3, 0, 7, 2, "CONDITIONING"],
        [10, 4, 0, 5, 3, "LATENT"],
        [11, 5, 0, 6, 0, "LATENT"],
        [12, 6, 0, 7, 3, "LATENT"],
        [13, 7, 0, 8, 0, "LATENT"],
        [14, 8, 0, 9, 0, "IMAGE"],
    ],
}

API_GRAPHS = {
    "txt2img": (API_TXT2IMG, (64, 64)),
    "img2img": (API_IMG2IMG, (96, 96)),
    "inpaint": (API_INPAINT, (64, 64)),
    "inpaint_plain_model": (API_INPAINT_PLAIN_MODEL, (64, 64)),
    "hires_fix": (API_HIRES_FIX, (96, 96)),
    "area_composition": (API_AREA_COMPOSITION, (128, 64)),
}
SAME_GRAPH_BOTH_FORMATS = {
    "txt2img": (API_TXT2IMG, UI_TXT2IMG),
    "inpaint": (API_INPAINT, UI_INPAINT),
    "hires_fix": (API_HIRES_FIX, UI_HIRES_FIX),
}
