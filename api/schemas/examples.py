"""The reference pages' example bodies and answers, shown in the OpenAPI documentation.

Request bodies are the pages' own examples (the empty `key` filled with a placeholder). The
answers are Darkroom's shapes, filled with the values of the pages' example responses.
"""

from __future__ import annotations

from typing import Any

Example = dict[str, Any]

V5_MIXER: Example = {
    "key": "YOUR_API_KEY",
    "seed": 12345,
    "init_image": "https://img.freepik.com/premium-photo/red-roses-rose-petals-white-backgroundvalentines-day-concept_167862-5720.jpg,https://huggingface.co/datasets/diffusers/test-arrays/resolve/main/stable_diffusion_inpaint/boy.png",
    "prompt": "rose man",
    "negative_prompt": "A polluted city",
    "init_image_weights": "0.5,0.7",
    "width": 800,
    "height": 600,
    "guidance_scale": 10,
    "steps": 100,
    "samples": 1,
}
V6_MIXER: Example = {
    "key": "YOUR_API_KEY",
    "seed": 12345,
    "init_image": [
        "https://assets.modelslab.ai/generations/063c90e1-1740-410c-be84-23d379dcfee2",
        "https://assets.modelslab.ai/generations/8205b5be-c212-4a3e-ba74-3c824b8acc25",
    ],
    "prompt": "rose man",
    "negative_prompt": "A polluted city",
    "width": 800,
    "height": 600,
    "guidance_scale": 10,
    "steps": 41,
    "samples": 1,
}
PIX2PIX: Example = {
    "key": "YOUR_API_KEY",
    "init_image": "https://d1okzptojspljx.cloudfront.net/generations/b3341a09-082e-474e-989f-72ec3f3bf7aa-0.png",
    "prompt": "make him woman",
    "image_guidance_scale": 1,
    "steps": 50,
    "guidance_scale": 7,
}
ENTERPRISE_IMG2IMG: Example = {
    "key": "enterprise_api_key",
    "model_id": "model_id",
    "prompt": "papercraft, quilling, layers, landscape",
    "negative_prompt": None,
    "init_image": "https://pub-8b49af329fae499aa563997f5d4068a4.r2.dev/generations/d8cd0add-8cd7-40a4-802b-7b80be45a14c-0.png",
    "width": "512",
    "height": "512",
    "samples": "1",
    "num_inference_steps": "20",
    "safety_checker": "yes",
    "enhance_prompt": "yes",
    "guidance_scale": 7.5,
    "strength": 0.7,
    "scheduler": "DDPMScheduler",
    "lora_model": None,
    "tomesd": "yes",
    "use_karras_sigmas": "yes",
    "vae": None,
    "lora_strength": None,
    "embeddings_model": None,
    "seed": None,
    "webhook": None,
    "track_id": None,
}

#: The request example of each documented submit path.
REQUEST_EXAMPLES: dict[str, Example] = {
    "/api/v5/img_mixer": V5_MIXER,
    "/api/v6/image_editing/img_mixer": V6_MIXER,
    "/api/v5/pix2pix": PIX2PIX,
    "/api/v1/enterprise/img2img": ENTERPRISE_IMG2IMG,
}

_PREFIX = "8aa6cb76-0c62-4ebc-a29a-3a3e3727bc88"
_LINK = f"https://darkroom.example.com/outputs/{_PREFIX}-0.png"
_META = {
    "prompt": "rose man",
    "negative_prompt": "A polluted city",
    "W": 800,
    "H": 600,
    "guidance_scale": 10.0,
    "steps": 50,
    "n_samples": 1,
    "seed": 12345,
    "seeds": [12345],
    "init_image": V5_MIXER["init_image"],
    "init_image_weights": "0.5,0.7",
    "file_prefix": _PREFIX,
    "outdir": "out",
}

PROCESSING_ANSWER: Example = {
    "status": "processing",
    "id": 349,
    "eta": 12.5,
    "progress": 0.4,
    "message": "Your request is being processed. Fetch the result with the fetch_result URL.",
    "messege": "Your request is being processed. Fetch the result with the fetch_result URL.",
    "tip": "Poll fetch_result, wait for the webhook, or send the header `Prefer: wait=N` to"
    " get the result in the answer when it is ready within N seconds.",
    "fetch_result": "https://darkroom.example.com/api/v5/fetch/349",
    "future_links": [_LINK],
    "output": [],
    "track_id": None,
    "meta": _META,
}
SUCCESS_ANSWER: Example = {
    "status": "success",
    "generationTime": 19.260561227798462,
    "id": 349,
    "output": [_LINK],
    "proxy_links": [_LINK],
    "track_id": None,
    "meta": {**_META, "model_load_time": 0.0},
}
FAILED_ANSWER: Example = {
    "status": "failed",
    "id": 349,
    "message": "Unable to fetch image from provided URL",
    "messege": "Unable to fetch image from provided URL",
    "track_id": None,
}
ANSWER_EXAMPLES: dict[str, Example] = {
    "processing": PROCESSING_ANSWER,
    "success": SUCCESS_ANSWER,
    "failed": FAILED_ANSWER,
}
INVALID_KEY: Example = {"status": "error", "message": "Invalid Api Key"}
FIELD_ERRORS: dict[str, Example] = {
    "missing field": {
        "status": "error",
        "message": {"prompt": ["The prompt field is required."]},
    },
    "out of range": {
        "status": "error",
        "message": {"guidance_scale": ["guidance_scale must be between 1 and 20"]},
    },
}
