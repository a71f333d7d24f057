"""python docs/gameboy_grid.py: the README's picture of the shipped LoRA, prompt | base | with the LoRA.

Each prompt with seed 0 and txt2img.py's defaults, through the embedded model without and with
ldm/assets/emoji-gameboy/emoji-gameboy.safetensors at weight 1 (as `python txt2img.py --prompt P --seed 0 --lora FILE`
would make it), shown 4x.
"""

from PIL import Image, ImageDraw

import ldm

PROMPTS = ["a red apple", "grinning face", "cat face", "a red heart", "rocket", "fire", "pizza", "a snowman"]
LORA = "ldm/assets/emoji-gameboy/emoji-gameboy.safetensors"
CELL, ZOOM, LABEL = 32, 4, 112

pipe = ldm.load_pipeline()
columns = []
for weight in (0.0, 1.0):
    pipe.load_lora(LORA, weight)
    columns.append([pipe.txt2img(prompt, seed=0, progress=False)[0] for prompt in PROMPTS])
    pipe.unload_loras()
side, rows = CELL * ZOOM, len(PROMPTS) // 2  # two blocks of prompt | base | with the LoRA, side by side
block = LABEL + 2 * side
grid = Image.new("RGB", (2 * block, 16 + rows * side), "white")
draw = ImageDraw.Draw(grid)
for i, prompt in enumerate(PROMPTS):
    x, y = (i // rows) * block, 16 + (i % rows) * side
    draw.text((x + 4, y + side // 2 - 6), prompt, fill="black")
    for j, (title, column) in enumerate(zip(("base", "with the LoRA"), columns)):
        draw.text((x + LABEL + j * side + 4, 2), title, fill="black")
        grid.paste(column[i].resize((side, side), Image.NEAREST), (x + LABEL + j * side, y))
grid.save("docs/emoji-gameboy.png")
print("wrote docs/emoji-gameboy.png")
