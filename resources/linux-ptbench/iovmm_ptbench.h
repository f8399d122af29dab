/* SPDX-License-Identifier: GPL-2.0-only */
/*
 * iovmm_ptbench: per-call cost of Linux's generic page table code (iommupt,
 * drivers/iommu/generic_pt) on the cases of iovmm's `scripts/bench dma-map`.
 *
 * Not part of Linux. scripts/linux-ptbench copies this file next to
 * kunit_iommu_pt.h and includes it from the KUnit build of
 * fmt/iommu_x86_64.c, so it sees the x86_64 format's internals and the KUnit
 * helpers (struct kunit_iommu_priv, kunit_pt_ops, count_valids(), ...).
 *
 * Every case builds a fresh table configured the way a real driver does:
 *   amd (default): AMD IOMMU v2 domain, drivers/iommu/amd/iommu.c:
 *                  X86_64_AMD_ENCRYPT_TABLES | FLUSH_RANGE, 47-bit VA, 4 levels
 *   vtd:           VT-d first stage domain, drivers/iommu/intel/iommu.c:
 *                  SIGN_EXTEND | FLUSH_RANGE, 48-bit VA, 4 levels
 * (not the KUnit test configurations, which add DMA_INCOHERENT and so lose
 * the single-page fast path). Map and unmap go through iommu_map() and
 * iommu_unmap(); the domain's iotlb_sync only frees the page free list, so
 * no IOTLB flush is counted. Translation goes through iommu_iova_to_phys().
 *
 * Timing: ktime_get_ns() around a batch of B calls (B sized so a batch lasts
 * tens to hundreds of microseconds: the UML clock ticks in 256 ns steps);
 * W warm-up batches, then S timed batches. One output line per case:
 *   IOVMM_PTBENCH case=<name> median_ns=.. min_ns=.. p10_ns=.. p90_ns=..
 *                 samples=S batch=B
 * with ns per call = batch ns / B. Map cases also print the leaves one call
 * wrote, checked against the expected count:
 *   IOVMM_PTBENCH_LEAVES case=<name> leaves=N leaf_size=..
 *
 * Kernel command line (core parameters, built-in code only):
 *   iovmm_ptbench_samples=S  (default 501)
 *   iovmm_ptbench_warmup=W   (default 20)
 *   iovmm_ptbench_cfg=amd|vtd
 */
#include <linux/ktime.h>
#include <linux/moduleparam.h>
#include <linux/random.h>
#include <linux/sizes.h>
#include <linux/sort.h>

static unsigned int iovmm_ptbench_samples = 501;
core_param(iovmm_ptbench_samples, iovmm_ptbench_samples, uint, 0444);
static unsigned int iovmm_ptbench_warmup = 20;
core_param(iovmm_ptbench_warmup, iovmm_ptbench_warmup, uint, 0444);
static char *iovmm_ptbench_cfg = "amd";
core_param(iovmm_ptbench_cfg, iovmm_ptbench_cfg, charp, 0444);

/* IOVAs start at 1 TiB (512 GiB aligned), PAs at 16 TiB (below 2^52) */
#define PTB_IOVA_BASE (1ULL << 40)
#define PTB_PA_BASE (1ULL << 44)
#define PTB_RW (IOMMU_READ | IOMMU_WRITE)

/* 1 GiB window of 4 KiB leaves for the translate and churn cases */
#define PTB_WINDOW SZ_1G
#define PTB_LOOKUP_BATCH 16384
#define PTB_CHURN_BATCH 4096
#define PTB_CHURN_POOL 65536

static int ptb_init(struct kunit *test)
{
	struct kunit_iommu_priv *priv;
	struct pt_iommu_x86_64_cfg *cfg;
	int ret;

	BUILD_BUG_ON(!__builtin_types_compatible_p(struct pt_iommu_table_cfg,
						   struct pt_iommu_x86_64_cfg));

	priv = kunit_kzalloc(test, sizeof(*priv), GFP_KERNEL);
	if (!priv)
		return -ENOMEM;
	priv->orig_nr_secondary_pagetable =
		global_node_page_state(NR_SECONDARY_PAGETABLE);

	priv->dummy_dev = kunit_device_register(test, "iovmm_ptbench_dev");
	if (IS_ERR(priv->dummy_dev))
		return PTR_ERR(priv->dummy_dev);
	set_dev_node(priv->dummy_dev, NUMA_NO_NODE);
	spin_lock_init(&priv->top_lock);

	cfg = &priv->cfg;
	if (!strcmp(iovmm_ptbench_cfg, "amd")) {
		cfg->common.features = BIT(PT_FEAT_X86_64_AMD_ENCRYPT_TABLES) |
				       BIT(PT_FEAT_FLUSH_RANGE);
		cfg->common.hw_max_vasz_lg2 = 47;
	} else if (!strcmp(iovmm_ptbench_cfg, "vtd")) {
		cfg->common.features = BIT(PT_FEAT_SIGN_EXTEND) |
				       BIT(PT_FEAT_FLUSH_RANGE);
		cfg->common.hw_max_vasz_lg2 = 48;
	} else {
		kunit_err(test, "iovmm_ptbench_cfg=%s: use amd or vtd\n",
			  iovmm_ptbench_cfg);
		return -EINVAL;
	}
	cfg->common.hw_max_oasz_lg2 = 52;
	cfg->top_level = 3;

	priv->fmt_table.iommu.nid = NUMA_NO_NODE;
	priv->fmt_table.iommu.driver_ops = &pt_kunit_driver_ops;
	priv->fmt_table.iommu.iommu_device = priv->dummy_dev;
	priv->domain.ops = &kunit_pt_ops;
	ret = pt_iommu_init(&priv->fmt_table, &priv->cfg, GFP_KERNEL);
	if (ret)
		return ret;
	priv->iommu = &priv->fmt_table.iommu;
	priv->common = common_from_iommu(&priv->fmt_table.iommu);
	priv->iommu->ops->get_info(priv->iommu, &priv->info);
	test->priv = priv;
	return 0;
}

static int ptb_cmp_u64(const void *a, const void *b)
{
	u64 x = *(const u64 *)a, y = *(const u64 *)b;

	return x < y ? -1 : x > y;
}

/* Per-call ns with two decimals, from a batch time */
#define PTB_NS(v) div_u64((v) * 100, batch) / 100, div_u64((v) * 100, batch) % 100

/* samples[] hold batch times in ns; prints per-call statistics */
static void ptb_report(struct kunit *test, const char *name, u64 *samples,
		       unsigned int nsamples, unsigned int batch)
{
	sort(samples, nsamples, sizeof(u64), ptb_cmp_u64, NULL);
	kunit_info(test,
		   "IOVMM_PTBENCH case=%s median_ns=%llu.%02llu min_ns=%llu.%02llu p10_ns=%llu.%02llu p90_ns=%llu.%02llu samples=%u batch=%u\n",
		   name, PTB_NS(samples[nsamples / 2]), PTB_NS(samples[0]),
		   PTB_NS(samples[nsamples / 10]),
		   PTB_NS(samples[(nsamples * 9) / 10]), nsamples, batch);
}

static u64 *ptb_alloc_samples(struct kunit *test)
{
	u64 *s;

	KUNIT_ASSERT_GT_MSG(test, iovmm_ptbench_samples, 0,
			    "iovmm_ptbench_samples must be at least 1");
	s = kunit_kcalloc(test, iovmm_ptbench_samples, sizeof(u64), GFP_KERNEL);
	KUNIT_ASSERT_NOT_NULL(test, s);
	return s;
}

struct ptb_map_case {
	const char *map_name;
	const char *unmap_name;
	u64 len;	/* bytes per call */
	u64 iova_off;	/* first IOVA = PTB_IOVA_BASE + iova_off */
	u64 stride;	/* distance between the IOVAs of one batch */
	unsigned int batch;
	unsigned int leaf_lg2;	/* leaf size one call must write */
	unsigned int leaves;	/* leaves one call must write */
};

/*
 * PA = PTB_PA_BASE + (IOVA - PTB_IOVA_BASE): IOVA and PA share their
 * alignment, so the largest leaf that fits the IOVA is used. No call covers a
 * whole table, so unmap frees no table and every sample sees the same tables.
 */
static const struct ptb_map_case ptb_map_cases[] = {
	/* 4096 consecutive pages: 16 MiB, 8 leaf tables */
	{ "map_4k", "unmap_4k", SZ_4K, 0, SZ_4K, 4096, 12, 1 },
	{ "map_2m", "unmap_2m", SZ_2M, 0, SZ_2M, 2048, 21, 1 },
	{ "map_1g", "unmap_1g", SZ_1G, 0, SZ_1G, 1024, 30, 1 },
	/* 1 MiB at 2 MiB + 1 MiB: 1 MiB aligned, not 2 MiB aligned */
	{ "map_256x4k", "unmap_256x4k", SZ_1M, SZ_1M, SZ_2M, 512, 12, 256 },
	/* 512 MiB, 1 GiB aligned */
	{ "map_256x2m", "unmap_256x2m", 256ULL * SZ_2M, 0, SZ_1G, 256, 21,
	  256 },
	/* 256 GiB, 512 GiB aligned: 192 calls span 96 TiB (< 2^47) */
	{ "map_256x1g", "unmap_256x1g", 256ULL * SZ_1G, 0, 512ULL * SZ_1G, 192,
	  30, 256 },
	/* 64 GiB of guest RAM, 1 GiB aligned: 256 calls span 16 TiB */
	{ "map_guest_64g", "unmap_guest_64g", 64ULL * SZ_1G, 0, 64ULL * SZ_1G,
	  256, 30, 64 },
};

static void ptb_map_case_desc(const struct ptb_map_case *c, char *desc)
{
	strscpy(desc, c->map_name, KUNIT_PARAM_DESC_SIZE);
}
KUNIT_ARRAY_PARAM(ptb_map, ptb_map_cases, ptb_map_case_desc);

/* Map one call's range, check and print the leaves it wrote, unmap it */
static void ptb_check_leaves(struct kunit *test, const struct ptb_map_case *c)
{
	struct kunit_iommu_priv *priv = test->priv;
	struct pt_range range = pt_top_range(priv->common);
	struct count_valids valids = {};
	u64 iova = PTB_IOVA_BASE + c->iova_off;
	u64 total = 0;
	unsigned int i;

	KUNIT_ASSERT_NO_ERRNO(test, iommu_map(&priv->domain, iova,
					      PTB_PA_BASE + c->iova_off, c->len,
					      PTB_RW, GFP_KERNEL));
	KUNIT_ASSERT_NO_ERRNO(test,
			      pt_walk_range(&range, __count_valids, &valids));
	for (i = 0; i != ARRAY_SIZE(valids.per_size); i++)
		total += valids.per_size[i];
	kunit_info(test,
		   "IOVMM_PTBENCH_LEAVES case=%s leaves=%llu leaf_size=%llu\n",
		   c->map_name, total, 1ULL << c->leaf_lg2);
	KUNIT_ASSERT_EQ_MSG(test, valids.per_size[c->leaf_lg2], (u64)c->leaves,
			    "%s wrote unexpected leaf sizes", c->map_name);
	KUNIT_ASSERT_EQ(test, total, (u64)c->leaves);
	KUNIT_ASSERT_EQ(test, iommu_unmap(&priv->domain, iova, c->len),
			(size_t)c->len);
}

static void ptb_map_unmap(struct kunit *test)
{
	const struct ptb_map_case *c = test->param_value;
	struct kunit_iommu_priv *priv = test->priv;
	u64 *map_s = ptb_alloc_samples(test);
	u64 *unmap_s = ptb_alloc_samples(test);
	u64 iova0 = PTB_IOVA_BASE + c->iova_off;
	u64 pa0 = PTB_PA_BASE + c->iova_off;
	int r;

	ptb_check_leaves(test, c);

	for (r = -(int)iovmm_ptbench_warmup; r < (int)iovmm_ptbench_samples;
	     r++) {
		size_t bad = 0;
		unsigned int j;
		u64 t0, t1, t2;
		int err = 0;

		t0 = ktime_get_ns();
		for (j = 0; j != c->batch; j++)
			err |= iommu_map(&priv->domain, iova0 + j * c->stride,
					 pa0 + j * c->stride, c->len, PTB_RW,
					 GFP_KERNEL);
		t1 = ktime_get_ns();
		for (j = 0; j != c->batch; j++)
			bad |= iommu_unmap(&priv->domain, iova0 + j * c->stride,
					   c->len) ^
			       c->len;
		t2 = ktime_get_ns();
		KUNIT_ASSERT_EQ_MSG(test, err, 0, "%s failed", c->map_name);
		KUNIT_ASSERT_EQ_MSG(test, bad, 0, "%s unmapped a wrong length",
				    c->unmap_name);
		if (r >= 0) {
			map_s[r] = t1 - t0;
			unmap_s[r] = t2 - t1;
		}
		cond_resched();
	}
	ptb_report(test, c->map_name, map_s, iovmm_ptbench_samples, c->batch);
	ptb_report(test, c->unmap_name, unmap_s, iovmm_ptbench_samples,
		   c->batch);
	KUNIT_ASSERT_EQ(test, count_valids(test), 0);
}

/* Map PTB_WINDOW at PTB_IOVA_BASE with 4 KiB leaves (PA offset by 4 KiB) */
#define PTB_WINDOW_PA (PTB_PA_BASE + SZ_4K)
static void ptb_map_window(struct kunit *test)
{
	struct kunit_iommu_priv *priv = test->priv;

	KUNIT_ASSERT_NO_ERRNO(test, iommu_map(&priv->domain, PTB_IOVA_BASE,
					      PTB_WINDOW_PA, PTB_WINDOW, PTB_RW,
					      GFP_KERNEL));
	KUNIT_ASSERT_EQ(test, count_valids_single(test, SZ_4K),
			PTB_WINDOW / SZ_4K);
}

static void ptb_lookup(struct kunit *test, const char *name, const u64 *iovas)
{
	struct kunit_iommu_priv *priv = test->priv;
	u64 *s = ptb_alloc_samples(test);
	int r;

	for (r = -(int)iovmm_ptbench_warmup; r < (int)iovmm_ptbench_samples;
	     r++) {
		unsigned int j;
		u64 bad = 0;
		u64 t0, t1;

		t0 = ktime_get_ns();
		for (j = 0; j != PTB_LOOKUP_BATCH; j++)
			bad |= iommu_iova_to_phys(&priv->domain, iovas[j]) ^
			       (iovas[j] - PTB_IOVA_BASE + PTB_WINDOW_PA);
		t1 = ktime_get_ns();
		KUNIT_ASSERT_EQ_MSG(test, bad, 0, "%s: wrong translation",
				    name);
		if (r >= 0)
			s[r] = t1 - t0;
		cond_resched();
	}
	ptb_report(test, name, s, iovmm_ptbench_samples, PTB_LOOKUP_BATCH);
}

/* iova_to_phys over 1 GiB of 4 KiB leaves: one IOVA, then random IOVAs */
static void ptb_translate(struct kunit *test)
{
	struct kunit_iommu_priv *priv = test->priv;
	u64 *iovas;
	unsigned int j;

	iovas = kunit_kcalloc(test, PTB_LOOKUP_BATCH, sizeof(u64), GFP_KERNEL);
	KUNIT_ASSERT_NOT_NULL(test, iovas);
	ptb_map_window(test);

	for (j = 0; j != PTB_LOOKUP_BATCH; j++)
		iovas[j] = PTB_IOVA_BASE + 0x12345678;
	ptb_lookup(test, "translate_hit", iovas);

	/* Uniform over the window: random page, random byte offset */
	for (j = 0; j != PTB_LOOKUP_BATCH; j++)
		iovas[j] = PTB_IOVA_BASE + get_random_u32_below(PTB_WINDOW);
	ptb_lookup(test, "translate_walk", iovas);

	KUNIT_ASSERT_EQ(test,
			iommu_unmap(&priv->domain, PTB_IOVA_BASE, PTB_WINDOW),
			(size_t)PTB_WINDOW);
	KUNIT_ASSERT_EQ(test, count_valids(test), 0);
}

/*
 * map + unmap of one 4 KiB page at random 4 KiB-aligned IOVAs in the 1 GiB
 * window, whose 512 leaf tables exist (mapped, then emptied page by page,
 * which frees no table) so the cost is the steady state of a busy domain.
 */
static void ptb_churn(struct kunit *test)
{
	struct kunit_iommu_priv *priv = test->priv;
	u64 *s = ptb_alloc_samples(test);
	u64 *iovas;
	u64 off;
	unsigned int pos = 0;
	unsigned int j;
	int r;

	iovas = kunit_kcalloc(test, PTB_CHURN_POOL, sizeof(u64), GFP_KERNEL);
	KUNIT_ASSERT_NOT_NULL(test, iovas);
	for (j = 0; j != PTB_CHURN_POOL; j++)
		iovas[j] = PTB_IOVA_BASE +
			   (u64)get_random_u32_below(PTB_WINDOW / SZ_4K) *
				   SZ_4K;

	ptb_map_window(test);
	for (off = 0; off != PTB_WINDOW; off += SZ_4K)
		KUNIT_ASSERT_EQ(test,
				iommu_unmap(&priv->domain, PTB_IOVA_BASE + off,
					    SZ_4K),
				(size_t)SZ_4K);
	KUNIT_ASSERT_EQ(test, count_valids(test), 0);

	for (r = -(int)iovmm_ptbench_warmup; r < (int)iovmm_ptbench_samples;
	     r++) {
		size_t bad = 0;
		u64 t0, t1;
		int err = 0;

		t0 = ktime_get_ns();
		for (j = 0; j != PTB_CHURN_BATCH; j++) {
			u64 iova = iovas[(pos + j) % PTB_CHURN_POOL];

			err |= iommu_map(&priv->domain, iova,
					 iova - PTB_IOVA_BASE + PTB_PA_BASE,
					 SZ_4K, PTB_RW, GFP_KERNEL);
			bad |= iommu_unmap(&priv->domain, iova, SZ_4K) ^ SZ_4K;
		}
		t1 = ktime_get_ns();
		pos = (pos + PTB_CHURN_BATCH) % PTB_CHURN_POOL;
		KUNIT_ASSERT_EQ_MSG(test, err, 0, "churn_4k: map failed");
		KUNIT_ASSERT_EQ_MSG(test, bad, 0, "churn_4k: unmap failed");
		if (r >= 0)
			s[r] = t1 - t0;
		cond_resched();
	}
	ptb_report(test, "churn_4k", s, iovmm_ptbench_samples,
		   PTB_CHURN_BATCH);
	KUNIT_ASSERT_EQ(test, count_valids(test), 0);
}

/* Which configuration ran, and the clock's step (a resolution sanity check) */
static void ptb_setup(struct kunit *test)
{
	u64 t0 = ktime_get_ns(), t1;

	do {
		t1 = ktime_get_ns();
	} while (t1 == t0);
	kunit_info(test,
		   "IOVMM_PTBENCH_CONFIG cfg=%s samples=%u warmup=%u clock_step_ns=%llu\n",
		   iovmm_ptbench_cfg, iovmm_ptbench_samples,
		   iovmm_ptbench_warmup, t1 - t0);
}

static struct kunit_case ptb_cases[] = {
	KUNIT_CASE(ptb_setup),
	KUNIT_CASE_PARAM(ptb_map_unmap, ptb_map_gen_params),
	KUNIT_CASE(ptb_translate),
	KUNIT_CASE(ptb_churn),
	{},
};

static struct kunit_suite ptb_suite = {
	.name = "iovmm_ptbench",
	.init = ptb_init,
	.exit = pt_kunit_iommu_exit,
	.test_cases = ptb_cases,
};
kunit_test_suites(&ptb_suite);
