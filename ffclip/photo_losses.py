"""FFCLIP's identity and background losses, as its training computes them, for images in [-1, 1].

- Identity: the face is cut from each image as FFCLIP does (pooled to 256 px, rows 35-222 and columns 32-219, pooled
  to 112 px), embedded by ArcFace (`ffclip.load_identity_net`), and the loss is the batch mean of 1 - cosine between
  the edited and the original embeddings; the original's side carries no gradient.
- Background: the face parser (`ffclip.load_face_parser`) labels both images at 512 px; the background is every
  pixel that neither labels as hair, and the loss is the mean squared difference of the two images with everything
  else zeroed (the mean is over all pixels, as FFCLIP's MSE of masked images is).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

FACE_POOL = 256
FACE_ROWS = slice(35, 223)
FACE_COLUMNS = slice(32, 220)
FACE_CROP = 112
PARSE_SIZE = 512
HAIR_CLASS = 13


def face_crop(images: torch.Tensor) -> torch.Tensor:
    """The face region of images `[B, 3, H, W]` as ArcFace's input `[B, 3, 112, 112]`."""
    if images.shape[2] != FACE_POOL:
        images = F.adaptive_avg_pool2d(images, FACE_POOL)
    return F.adaptive_avg_pool2d(images[:, :, FACE_ROWS, FACE_COLUMNS], FACE_CROP)


def identity_loss(
    identity_net: Callable[[torch.Tensor], torch.Tensor], edited: torch.Tensor, original: torch.Tensor
) -> torch.Tensor:
    """Batch mean of 1 - cosine between the unit ArcFace embeddings of the edited and the original faces."""
    target = identity_net(face_crop(original)).detach()
    return (1 - (identity_net(face_crop(edited)) * target).sum(dim=1)).mean()


@torch.no_grad()
def background_mask(parser: Callable[[torch.Tensor], torch.Tensor], images: torch.Tensor) -> torch.Tensor:
    """1 where the parser, run at 512 px, finds no hair, else 0, brought back to the images' size: `[B, 1, H, W]`."""
    labels = parser(F.adaptive_avg_pool2d(images, PARSE_SIZE)).argmax(dim=1, keepdim=True)
    return F.adaptive_avg_pool2d((labels != HAIR_CLASS).to(images.dtype), images.shape[-2:])


def background_loss(
    parser: Callable[[torch.Tensor], torch.Tensor], edited: torch.Tensor, original: torch.Tensor
) -> torch.Tensor:
    """Mean squared difference of the two images over the pixels that neither image's parse labels as hair."""
    both = ((background_mask(parser, edited) + background_mask(parser, original)) == 2).to(edited.dtype)
    return F.mse_loss(edited * both, original * both)
