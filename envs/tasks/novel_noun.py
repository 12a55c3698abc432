"""NovelNoun (held out): "A dax is the red cube. Place the dax on top of the blue cylinder."

The prompt names the object by a made-up word; the code labels use the real description.
Success as PlaceOnTop.
"""

from .place_on_top import PlaceOnTop
from .registry import register_task

NOVEL_WORDS = ("dax", "blicket", "wug", "zorp", "fep", "toma", "kiki", "tufa")


@register_task("NovelNoun", level="held_out", max_steps=250)
class NovelNoun(PlaceOnTop):
    def sample_layout(self, rng):
        layout = super().sample_layout(rng)
        layout.params["word"] = str(rng.choice(NOVEL_WORDS))
        return layout

    def prompt(self):
        p = self.layout.params
        return f"A {p['word']} is the {p['obj']}. Place the {p['word']} on top of the {p['target']}."
