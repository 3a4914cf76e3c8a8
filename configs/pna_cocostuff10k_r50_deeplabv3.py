"""PNA on COCO-Stuff 10k with the DeepLabV3 coarse head, ResNet-50 (paper Table 7): the
reference's mmsegmentation config configs/pna/pna-deeplabv3_r50-d16_512x512_40k_cocostuff10k.py.
As configs/pna_voc_r50_fcn.py except: 171 classes, ResNetV1c-50 at output stride 16 (d16),
mmseg's ASPPHead (dilations 1/12/24/36, 512 channels), 40k iterations with a 400-iteration
warmup (same AdamW 1e-4, wd 1e-4, poly 0.9), batch 16 (4 per GPU x 4 GPUs; the reference's
test.sh uses 4 GPUs), checkpoints every 4k iterations. Test mode as VOC: Resize keep_ratio to
(2048, 512), logits resized back.

Labels: mmseg's tools/convert_datasets/coco_stuff10k.py writes *_labelTrainIds.png with ids
1..171 and 0 = unlabeled, and the dataset sets reduce_zero_label=True (0 -> 255, k -> k - 1);
so does this config (`config.dataset.reduce_zero_label`, applied by the training loader and
by the evaluation): point the folders at those PNGs as they are.

    python train.py --config configs/pna_cocostuff10k_r50_deeplabv3.py --workdir runs/cocostuff \
      --config.dataset.data_dir=/data/tfds \
      --config.dataset.builder_kwargs.images=/data/coco_stuff10k/images/train2014 \
      --config.dataset.builder_kwargs.labels=/data/coco_stuff10k/annotations/train2014 \
      --config.init_from=/data/resnet50_v1c.pth
"""

from pathlib import Path

import ml_collections

from jax_refine.train.loop import load_config_file

# mmseg COCOStuffDataset.CLASSES (171 classes: 80 things, 91 stuff).
COCO_STUFF_CLASSES = (
    "person,bicycle,car,motorcycle,airplane,bus,train,truck,boat,traffic light,"
    "fire hydrant,stop sign,parking meter,bench,bird,cat,dog,horse,sheep,cow,elephant,bear,"
    "zebra,giraffe,backpack,umbrella,handbag,tie,suitcase,frisbee,skis,snowboard,"
    "sports ball,kite,baseball bat,baseball glove,skateboard,surfboard,tennis racket,"
    "bottle,wine glass,cup,fork,knife,spoon,bowl,banana,apple,sandwich,orange,broccoli,"
    "carrot,hot dog,pizza,donut,cake,chair,couch,potted plant,bed,dining table,toilet,tv,"
    "laptop,mouse,remote,keyboard,cell phone,microwave,oven,toaster,sink,refrigerator,book,"
    "clock,vase,scissors,teddy bear,hair drier,toothbrush,banner,blanket,branch,bridge,"
    "building-other,bush,cabinet,cage,cardboard,carpet,ceiling-other,ceiling-tile,cloth,"
    "clothes,clouds,counter,cupboard,curtain,desk-stuff,dirt,door-stuff,fence,floor-marble,"
    "floor-other,floor-stone,floor-tile,floor-wood,flower,fog,food-other,fruit,"
    "furniture-other,grass,gravel,ground-other,hill,house,leaves,light,mat,metal,"
    "mirror-stuff,moss,mountain,mud,napkin,net,paper,pavement,pillow,plant-other,plastic,"
    "platform,playingfield,railing,railroad,river,road,rock,roof,rug,salad,sand,sea,shelf,"
    "sky-other,skyscraper,snow,solid-other,stairs,stone,straw,structural-other,table,tent,"
    "textile-other,towel,tree,vegetable,wall-brick,wall-concrete,wall-other,wall-panel,"
    "wall-stone,wall-tile,wall-wood,water-other,waterdrops,window-blind,window-other,wood"
)


def get_config() -> ml_collections.ConfigDict:
    config = load_config_file(Path(__file__).with_name("pna_voc_r50_fcn.py"))
    config.model.coarse_head = "aspp"  # mmseg ASPPHead; models.pna.VARIANTS: output stride 16
    config.model.num_classes = 171
    config.dataset.builder_kwargs.class_names = COCO_STUFF_CLASSES
    config.eval.builder_kwargs.class_names = COCO_STUFF_CLASSES
    config.dataset.reduce_zero_label = True  # LoadAnnotations(reduce_zero_label=True)
    config.total_steps = 40_000  # mmseg schedule_40k
    config.warmup_steps = 400
    config.checkpoint_every = 4_000
    return config
