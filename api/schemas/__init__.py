"""Request bodies of the endpoints, as the reference pages define them.

Each model accepts the hosted API's spellings (see api.fields), ignores unknown fields, and
turns itself into a JobSpec: the one normalised shape that the worker runs.
"""

from api.schemas.fetch import FetchRequest
from api.schemas.img2img import Img2ImgRequest, V3Img2ImgRequest
from api.schemas.mixer import MixerRequest, V5MixerRequest
from api.schemas.pix2pix import Pix2PixRequest

__all__ = [
    "FetchRequest",
    "Img2ImgRequest",
    "MixerRequest",
    "Pix2PixRequest",
    "V3Img2ImgRequest",
    "V5MixerRequest",
]
