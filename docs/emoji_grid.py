"""python docs/emoji_grid.py: the README's grid, 16 prompts through the embedded model with txt2img.py's defaults.

Each prompt gets seed 0 (as `python txt2img.py --prompt P --seed 0` would make it), shown 4x with its prompt.
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
