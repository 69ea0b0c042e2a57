"""replay: A's model continues on B mixed with a share of A's data (joint training, continued, with
the old domains' share as the one option)."""
from typing import Annotated

from pydantic import Field

from ..config import arg, config
from .method import AdaptContext, Method, mix


class Replay(Method):
    name = "replay"
    needs_old_data = True

    @config
    class Options:
        fraction: Annotated[float, Field(gt=0, lt=1)] = arg(0.2, "share of training windows from the old domains")

    def mixture(self, ctx: AdaptContext):
        return mix(ctx, 1 - self.options.fraction)
