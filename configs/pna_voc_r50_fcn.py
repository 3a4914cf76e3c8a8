"""PNA, the paper's Pascal VOC setting (Liu et al., AAAI 2023, Table 1): ResNet-50 with the FCN
coarse head at output stride 32 — the reference's mmsegmentation branch,
configs/pna/pna_fcn_r50-d32_512x512_20k_voc.py, reproduced key by key:

* model: mmseg ResNetV1c-50 (deep stem, d32: strides 1/2/2/2, no dilation), FCNHead on res5
  (2 x 3x3 conv of 512, concat input, Dropout2d 0.1), mmseg's PNAHead (embeddings with bias)
  D = 96/192/384/768, window 9, nearest upsampling, auxiliary FCNHead on res4 (256, one
  conv, loss weight 0.4, training only). SyncBN everywhere (the train step's batch statistics
  are global).
* losses: mmseg's CrossEntropyLoss with avg_non_ignore=False ('cross_entropy_all': the sum over
  valid pixels / all pixels), each head's logits resized to the label size (bilinear,
  align_corners=False); 1.0 * P0 + 0.1 * (P1 + P2 + P3 + P4) + 0.4 * aux.
* optimiser: AdamW lr 1e-4, betas (0.9, 0.999) (optax's defaults, eps 1e-8 as PyTorch),
  weight decay 1e-4 except parameters matching mmseg's custom_keys (decay_mult 0, see
  `no_decay_keys`), poly decay power 0.9 to 0 over 20k iterations, linear warmup over 200
  iterations from 1e-6 * lr (mmcv), no gradient clipping, no backbone lr multiplier.
  The reference trains in fp16 with a dynamic loss scale (mmcv Fp16OptimizerHook);
  here float32 (config.dtype = 'bfloat16' is the accelerator-friendly alternative).
* data: VOC 2012 + SBD aug (10,582 images, 21 classes), mmseg's pipeline (`config.augment`,
  `PnaAugment` in its mmseg modes, rule by rule): Resize to img_scale (2048, 512) x ratio
  U[0.5, 2.0] (keep ratio, OpenCV bilinear / nearest), RandomCrop 512x512 (cat_max_ratio
  0.75), flip, PhotoMetricDistortion, Pad (image 0 after normalisation, label 255); batch
  16 = 4 per GPU x 4 GPUs (the reference README's training runs on 4 GPUs; train.sh's
  DeepLabV3 run uses 8 x 2, also 16).
* test: mmseg's 'whole' mode: Resize keep_ratio to img_scale (2048, 512), logits resized back
  to the original image (`config.eval.resize`); the output of a PNA model is its last stage
  resized straight to the input size (`models.pna.final_logits(mode='mmseg')`).

As mmseg's CascadeEncoderDecoder, training runs the coarse head twice (once for its loss,
once more — fresh dropout mask, second BN update — as the PNA head's input;
`PNASegmentor.recompute_coarse`, on with `pna_head='mmseg'`).

Data: a `semantic_folder` build of local folders (images name.jpg + label maps name.png with
class ids 0..20 and 255 = ignore; SBD's .mat labels must be converted to PNG first):

    python train.py --config configs/pna_voc_r50_fcn.py --workdir runs/pna_voc \
      --config.dataset.data_dir=/data/tfds \
      --config.dataset.builder_kwargs.images=/data/VOCaug/JPEGImages \
      --config.dataset.builder_kwargs.labels=/data/VOCaug/SegmentationClassAug \
      --config.init_from=/data/resnet50_v1c.pth
    python evaluate.py --config configs/pna_voc_r50_fcn.py --workdir runs/pna_voc \
      --config.eval.builder_kwargs.images=/data/VOC2012/JPEGImages_val \
      --config.eval.builder_kwargs.labels=/data/VOC2012/SegmentationClass_val

`init_from`: open-mmlab's ImageNet `resnet50_v1c` weights (the config's `pretrained`), or an
official mmseg PNA checkpoint (converted on the fly), or a `python -m jax_refine.convert pna`
directory. The other mmseg configs derive from this file (pna_voc_r101_psp.py,
pna_voc_r101_deeplabv3.py, pna_voc_swin_t.py, pna_voc_swin_b.py,
pna_cocostuff10k_r50_deeplabv3.py); the detectron2 ones from pna_detectron2_base.py.

Multi-host: as configs/crm_paper.py (JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES /
JAX_PROCESS_ID); batch_size is the global batch.
"""

import ml_collections

VOC_CLASSES = (
    "background,aeroplane,bicycle,bird,boat,bottle,bus,car,cat,chair,cow,diningtable,dog,"
    "horse,motorbike,person,pottedplant,sheep,sofa,train,tvmonitor"
)
# mmseg's paramwise custom_keys (decay_mult 0) are substrings of the torch parameter name.
# mmseg's 'norm' hits every LayerNorm — the PNA head's (norm1, norm1_2, norm2, out_norm, the
# Restormer block's norm1/norm2) and the Swin's (blocks' norm1/norm2, patch_embed.norm,
# downsample.norm, the output norm0..3) — but no BatchNorm (mmseg names those 'bn', stem.1,
# downsample.1). jax_refine's ConvNorm calls its BatchNorm 'norm', so the LayerNorms are named
# here by the substrings that select exactly them in the '/'-joined Flax paths.
# 'rpb': the neighbourhood attention's relative position bias.
MMSEG_NO_DECAY_KEYS = ("absolute_pos_embed", "relative_position_bias_table", "rpb", "norm1",
                       "norm2", "out_norm", "backbone/norm", "patch_embed/norm",
                       "downsample/norm")


def get_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.task = "pna"  # selects the PNA model, step, pipeline, optimiser and export
    # jax_refine.models.pna.build_pna keyword arguments (stored in the WORKDIR/pna export).
    config.model = ml_collections.ConfigDict(dict(
        coarse_head="fcn",  # 'fcn' (d32), 'psp' / 'aspp' (d16; mmseg), 'deeplabv3', 'semantic_fpn'
        num_classes=21,
        backbone="resnet_v1c",  # mmseg ResNetV1c; 'resnet' (detectron2), 'swin_t', 'swin_b'
        pna_head="mmseg",  # mmseg's PNAHead (embeddings with bias); 'detectron2'
        auxiliary_head=True,  # mmseg's auxiliary FCNHead on res4 (training only)
        depth=50,  # ResNet depth (18/34 basic blocks for small models)
        width=64,  # ResNet stem / first-stage width
        stem="deeplab",  # detectron2 ResNet only ('deeplab' R-52 / 'torchvision')
        embed_dims=(96, 192, 384, 768),  # PNA widths for res2..res5
        window_sizes=(9, 9, 9, 9),  # neighbourhood windows for res2..res5
        upsample_mode="nearest",  # how a stage upsamples the previous prediction
        use_sa=True,  # self-aggregation (Restormer) shortcut in every PNA layer
        pool_kernel_size=ml_collections.config_dict.placeholder(tuple),  # detectron2 ASPP
        head_kwargs=ml_collections.ConfigDict(),  # coarse head widths ({} = official)
        aux_head_kwargs=ml_collections.ConfigDict(),  # auxiliary head widths ({} = official)
        backbone_kwargs=ml_collections.ConfigDict(),  # e.g. stage_sizes of a small test net
        freeze_backbone_bn=False,
    ))

    config.dataset = ml_collections.ConfigDict()
    config.dataset.name = "semantic_folder"  # or 'synthetic' (multi-class scenes)
    config.dataset.data_dir = ""  # TFDS build directory (required for builders)
    config.dataset.config = ""
    config.dataset.split = "train"
    config.dataset.label_key = "label"  # the record field holding the label map
    config.dataset.builder_kwargs = ml_collections.ConfigDict(dict(
        images="", labels="", class_names=VOC_CLASSES, split="train"))
    config.dataset.min_size = 0  # synthetic only: scene side range and object classes
    config.dataset.max_size = 0
    config.dataset.num_classes = 0
    # mmseg LoadAnnotations(reduce_zero_label): label 0 -> 255, k -> k - 1, in the training
    # loader and in evaluation (COCO-Stuff's label maps hold ids 1..171, 0 = unlabelled).
    config.dataset.reduce_zero_label = False

    # PnaAugment fields: mmseg's Resize(img_scale=(2048, 512), ratio_range=(0.5, 2.0)),
    # RandomCrop(crop_size, cat_max_ratio=0.75), RandomFlip(0.5), PhotoMetricDistortion,
    # Pad(crop_size, pad_val=0, seg_pad_val=255).
    config.augment = ml_collections.ConfigDict(dict(
        resize="mmseg_ratio", img_scale=(2048, 512), scale_range=(0.5, 2.0),
        single_category_max_area=0.75, crop_rule="mmseg", colour="mmseg"))
    # losses.pna_loss: loss type of P0 (and of the auxiliary head) and of P1..P4, weights.
    config.loss = ml_collections.ConfigDict(dict(
        coarse_loss="cross_entropy_all", stage_loss="cross_entropy_all", coarse_weight=1.0,
        stage_weight=0.1, aux_weight=0.4, ratio=0.2, ignore_label=255))

    config.crop_size = (512, 512)  # (height, width)
    config.batch_size = 16  # global batch (all devices of all hosts): 4 per GPU x 4 GPUs
    config.total_steps = 20_000  # mmseg schedule_20k (IterBasedRunner max_iters)
    config.learning_rate = 1e-4  # AdamW; poly: lr * (1 - step / total_steps) ** lr_power
    config.lr_power = 0.9
    config.warmup_steps = 200  # mmcv linear warmup: lr * (1 - (1 - ratio) * (1 - k / steps))
    config.warmup_ratio = 1e-6
    config.weight_decay = 1e-4  # decoupled (AdamW)
    config.weight_decay_norm = ml_collections.config_dict.placeholder(float)  # None = as above
    config.no_decay_keys = MMSEG_NO_DECAY_KEYS  # substrings of the '/'-joined parameter path
    config.clip_norm = 0.0  # mmseg's optimizer_config has no grad_clip (0 = no clipping)
    config.backbone_multiplier = 1.0  # backbone lr factor (mmseg: none)
    config.dtype = "float32"  # compute dtype: 'float32' or 'bfloat16' (params stay f32)
    config.seed = 0

    config.log_every = 50
    config.checkpoint_every = 2_000  # mmseg checkpoint_config interval
    config.keep_checkpoints = 3
    config.export_every_checkpoint = False  # also refresh WORKDIR/pna at each checkpoint
    # PNA checkpoint dir / official .pth (detectron2 or mmseg layout), or ImageNet backbone
    # weights ('' = scratch); see jax_refine.train.checkpoint.load_pna_init_variables.
    config.init_from = ""
    config.distributed = False  # force jax.distributed.initialize() (cluster auto-detect)
    # Every eval_every steps (and at the end) the loop runs this config's evaluation (the
    # `eval` block below, as evaluate.py) and writes its scalars and a panel to TensorBoard
    # and WORKDIR/eval/step_N; 0 = never. (mmseg evaluates every 2,000 iterations.)
    config.eval_every = 0
    config.profile_every = 0  # steps between 5-step jax.profiler traces (0 = none)
    # GPU: XLA_FLAGS=--xla_gpu_deterministic_ops=true, needed for bitwise-exact resume and
    # repeatable runs on GPUs (scatter-add gradients are otherwise non-deterministic); slower.
    config.deterministic = False

    # evaluate.py: per-stage mIoU, fwIoU, mACC, pACC on a semantic_folder split (or held-out
    # synthetic scenes when dataset.name is 'synthetic'); see jax_refine.train.evaluate_pna.
    config.eval = ml_collections.ConfigDict()
    config.eval.data_dir = ""  # '' = dataset.data_dir
    config.eval.builder_kwargs = ml_collections.ConfigDict(dict(
        images="", labels="", class_names=VOC_CLASSES, split="val"))
    # Test-time resize (`evaluate_pna.ResizeProtocol`); the prediction is scored at the
    # original size. 'none' = native size; 'shortest_edge' = detectron2's ResizeShortestEdge
    # (min_size, max_size; Pillow bilinear); 'keep_ratio' = mmseg's Resize(img_scale=scale,
    # keep_ratio=True) (scale = (long, short); OpenCV bilinear). This config: mmseg's test
    # pipeline, Resize(img_scale=(2048, 512), keep_ratio=True), mode 'whole'.
    config.eval.resize = ml_collections.ConfigDict(dict(
        mode="keep_ratio", min_size=0, max_size=0, scale=(2048, 512)))
    # Classes that count in the mIoU: 'gt_or_pred' (mmseg; a class predicted but absent from
    # the labels scores 0) or 'gt' (detectron2's SemSegEvaluator: classes in the labels only).
    config.eval.iou_classes = "gt_or_pred"
    # Class ids that mIoU and mACC average over (() = all), e.g. Trans10k's (1, 2).
    config.eval.mean_classes = ()
    config.eval.synthetic_size = 0  # synthetic only: scene side
    config.eval.num_images = 0  # 0 = all
    config.eval.num_pngs = 4  # side-by-side PNGs (image | P0 | P4 | ground truth)
    config.eval.batch_size = 8  # images per call, sharded over all devices (shape buckets)
    # Padding of each image: 1 = to the model's size divisibility only, as the references
    # (exact; one compilation per image size); e.g. 64 = sides rounded up to multiples of 64
    # so that nearby sizes share a compilation (logits near the border then differ).
    config.eval.bucket = 1
    return config
