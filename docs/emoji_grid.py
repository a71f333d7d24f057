"""python docs/emoji_grid.py: the README's grids, through the embedded model with txt2img.py's defaults.

docs/emoji-grid.png: 16 emoji names, each with seed 0 (as `python txt2img.py --prompt P --seed 0` would make it),
shown 4x with its prompt. docs/emoji-generic.png: 6 generic prompts (CLDR subgroups, the dataset's generic captions),
each with seeds 0-5 (`--n-samples 6 --seed 0`), shown 3x.
"""

from PIL import Image, ImageDraw

import ldm

PROMPTS = [
    "a red apple",
    "grinning face",
    "cat face",
    "a red heart",
    "a blue heart",
    "pizza",
    "rocket",
    "sun",
    "a green apple",
    "crying face",
    "dog face",
    "banana",
    "flag of Japan",
    "a snowman",
    "fire",
    "a ghost",
]
GENERIC = [
    "an emoji of food fruit",
    "an emoji of animal mammal",
    "an emoji of face smiling",
    "an emoji of country flag",
    "an emoji of heart",
    "an emoji of transport ground",
]
CELL, ZOOM, LABEL = 32, 4, 16

pipe = ldm.load_pipeline()
images = [pipe.txt2img(prompt, seed=0, progress=False)[0] for prompt in PROMPTS]  # the model's defaults
side = CELL * ZOOM
grid = Image.new("RGB", (4 * side, 4 * (side + LABEL)), "white")
draw = ImageDraw.Draw(grid)
for i, (prompt, image) in enumerate(zip(PROMPTS, images)):
    x, y = (i % 4) * side, (i // 4) * (side + LABEL)
    grid.paste(image.resize((side, side), Image.NEAREST), (x, y))
    draw.text((x + 4, y + side + 2), prompt, fill="black")
grid.save("docs/emoji-grid.png")
print("wrote docs/emoji-grid.png")

side, width = CELL * 3, 180
grid = Image.new("RGB", (width + 6 * side, len(GENERIC) * side), "white")
draw = ImageDraw.Draw(grid)
for row, prompt in enumerate(GENERIC):
    draw.text((4, row * side + side // 2 - 6), prompt, fill="black")
    for col, image in enumerate(pipe.txt2img([prompt] * 6, seed=0, progress=False)):
        grid.paste(image.resize((side, side), Image.NEAREST), (width + col * side, row * side))
grid.save("docs/emoji-generic.png")
print("wrote docs/emoji-generic.png")
