"""`POST /api/v7/images/image-to-image`: the body the official CLI (`modelslab-cli`) sends.

The CLI sends `{init_image, key, model_id, prompt, strength}` and, when asked, `webhook`
(recorded from modelslab-cli 0.2.2; docs/CLIENTS.md). It is the enterprise img2img body less
the enterprise page's extras, so it is that body with one difference: the v7 API does not
rewrite prompts, so `enhance_prompt` defaults to no (a client may still send it).
"""

from __future__ import annotations

from api.fields import Flag
from api.schemas.img2img import Img2ImgRequest


class V7Img2ImgRequest(Img2ImgRequest):
    """The v7 image-to-image body: the img2img JobSpec with the prompt kept as sent."""

    enhance_prompt: Flag = False
