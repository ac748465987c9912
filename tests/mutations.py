"""Checks the test suite itself: applies each deliberate bug below, alone, to a copy of the
committed tree (HEAD), runs the tests that should catch it, and prints which of them failed.

    .venv/bin/python tests/mutations.py                       # every mutation, against its tests
    .venv/bin/python tests/mutations.py --full                # every mutation, against the whole suite
    .venv/bin/python tests/mutations.py --working-tree        # your uncommitted changes included
    .venv/bin/python tests/mutations.py unet_ignores_t ...    # only the mutations named

A mutation is (name, file, exact old text, new text, tests): the old text must occur exactly once
in the file, or the script stops before running anything. The tree is copied once, so edits made
while this runs change nothing; --working-tree copies the files git tracks and the untracked ones
it does not ignore, as they are now. The chosen tests first run unmutated and must pass. A test
that errors (in a fixture, say) is listed with "(error)". Exits 1 when a mutation survives.
pytest does not collect this file (no test_ prefix).
"""
import os
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMEOUT_SECONDS = 3600       # per pytest run; a hang counts as caught, but is reported as such

SECOND_STAGE = "tests/test_second_stage.py::"
PRE_TRAIN = "tests/test_pre_train.py::"
GAUSSIAN_SAMPLERS = [SECOND_STAGE + "test_samplers_reach_the_gaussian_data_distribution",
                     SECOND_STAGE + "test_ddpm_keeps_one_shared_trajectory_and_samplers_clip_x0"]
FIRST_STAGE_LEARNING = ["tests/test_models.py", SECOND_STAGE + "test_first_stage_beats_the_per_z_average_slice"]
GENERATOR_LOSS = [PRE_TRAIN + "test_generator_loss_is_the_sum_of_its_terms"]
DIFFUSION_LEARNING = [SECOND_STAGE + "test_unet_shapes_zero_start_and_z_effect",
                      SECOND_STAGE + "test_diffusion_learns_to_use_its_timestep_and_z"]
PRIOR_LEARNING = [SECOND_STAGE + "test_prior_logits_depend_only_on_earlier_codes_and_z",
                  SECOND_STAGE + "test_prior_beats_the_code_histogram_reads_its_context_resumes_and_summarises"]

MUTATIONS = [
    # the list (issue 8)
    ("ddpm_posterior_mean_coefficient", "model_diffusion.py",
     "(1 - abar_previous) * (1 - beta).sqrt() * x", "(1 - abar_previous) * (1 - beta) * x", GAUSSIAN_SAMPLERS),
    ("ddpm_noise_scale", "model_diffusion.py",
     "x = x + variance.sqrt() * volume_noise", "x = x + variance * volume_noise", GAUSSIAN_SAMPLERS),
    ("ddim_eps_random", "model_diffusion.py",
     "eps = (x - abar.sqrt() * x0) / (1 - abar).sqrt()", "eps = torch.randn_like(x)", GAUSSIAN_SAMPLERS),
    ("unet_ignores_t", "model_diffusion.py",
     "cond = self.time_embedding(t)", "cond = self.time_embedding(t * 0)", DIFFUSION_LEARNING),
    ("prior_ignores_earlier_codes", "model_prior.py",
     "earlier = self.code_embedding(self._place_offsets(patches[:, :-1])).sum(2)",
     "earlier = self.code_embedding(self._place_offsets(patches[:, :-1])).sum(2) * 0", PRIOR_LEARNING),
    ("decoder_ignores_latent", "model_VAE.py",
     "self.body(self.conv_in(latents), cond)", "self.body(self.conv_in(latents * 0), cond)", FIRST_STAGE_LEARNING),
    ("vae_loss_without_kl", "pre_train.py",
     "total = rec_loss + kl_weight_now * regulariser", "total = rec_loss", GENERATOR_LOSS),
    ("logger_one_panel", "logger.py",
     "panels = {title: names for title, names in panels.items() if names}",
     "panels = {title: names for title, names in list(panels.items())[:1] if names}", ["tests/test_logger.py"]),
    # more of the same kinds
    ("vqvae_loss_without_commitment", "pre_train.py",
     "total = rec_loss + regulariser", "total = rec_loss", GENERATOR_LOSS),
    ("commitment_without_encoder_gradient", "module.py",
     "F.mse_loss(latents, quantised)", "F.mse_loss(latents.detach(), quantised)", ["tests/test_models.py"]),
    ("generator_loss_without_gan", "pre_train.py",
     "total = total + weight * (g_loss + g_random_loss)", "total = total", GENERATOR_LOSS),
    ("generator_loss_without_random_latent_term", "pre_train.py",
     "total = total + weight * (g_loss + g_random_loss)", "total = total + weight * g_loss", GENERATOR_LOSS),
    ("encoder_ignores_image", "model_VAE.py",
     "return self.encoder(images, self._embed(self.encoder_z_embedding, z))",
     "return self.encoder(images * 0, self._embed(self.encoder_z_embedding, z))", FIRST_STAGE_LEARNING),
    ("decoder_ignores_z", "model_VAE.py",
     "return self.decoder(latents, self._embed(self.decoder_z_embedding, z))",
     "return self.decoder(latents, self._embed(self.decoder_z_embedding, z * 0))", ["tests/test_models.py"]),
    ("unet_ignores_z", "model_diffusion.py",
     "cond = cond + embed_z(self.z_embedding, z)", "cond = cond + embed_z(self.z_embedding, z * 0)",
     DIFFUSION_LEARNING),
    ("guidance_ignored", "module.py",
     "return unconditional + scale * (conditional - unconditional)", "return conditional",
     [SECOND_STAGE + "test_null_z_drops_the_condition_and_guidance_extrapolates_from_it",
      SECOND_STAGE + "test_guided_greedy_draws_follow_the_guidance_formula"]),
    ("null_z_never_drawn", "module.py",
     "    if not share:\n        return z\n", "    return z\n",
     [SECOND_STAGE + "test_hide_z_hides_its_share_and_keeps_the_rest"]),
    ("prior_trained_without_null_z", "train_viT.py", "model(codes, hide_z(z, Z_DROP), return_nats_per_code=True)",
     "model(codes, z, return_nats_per_code=True)",
     [SECOND_STAGE + "test_prior_beats_the_code_histogram_reads_its_context_resumes_and_summarises"]),
    ("null_z_read_as_slice_0", "module.py",
     "return embedding(z.clamp(min=0)) * (z != NULL_Z)[:, None]", "return embedding(z.clamp(min=0))",
     [SECOND_STAGE + "test_null_z_drops_the_condition_and_guidance_extrapolates_from_it"]),
    # Gumbel noise with its sign flipped (the prior's draws): argmax(l - G) is no draw from softmax(l)
    ("gumbel_sign", "module.py", "gumbel = -torch.log(-torch.log(", "gumbel = torch.log(-torch.log(",
     [SECOND_STAGE + "test_sampled_first_codes_follow_the_softmax_of_their_logits",
      "tests/test_models.py::test_gumbel_max_draws_alike_where_two_laws_agree"]),
    # every slice of a volume drawn with its own noise (the prior's, the diffusion's, the snap's)
    ("volume_noise_not_shared", "module.py", "    if not noise_groups:\n        return draw(",
     "    if True:\n        return draw(",
     [SECOND_STAGE + "test_slices_of_a_volume_share_their_sampling_noise",
      SECOND_STAGE + "test_ddpm_keeps_one_shared_trajectory_and_samplers_clip_x0",
      "tests/test_models.py::test_snap_draws_alike_within_a_volume_and_apart_across_volumes"]),
    ("setting_chosen_by_worst_rank", "realism.py",
     "best = min(rows, key=lambda row: row[\"mean_rank\"])", "best = max(rows, key=lambda row: row[\"mean_rank\"])",
     ["tests/test_realism.py::test_choose_setting_picks_the_real_looking_setting_on_validate"]),
    ("prior_ignores_z", "model_prior.py",
     "    def _patch_logits(self, patches, z):\n",      # z reaches the start token and every position
     "    def _patch_logits(self, patches, z):\n        z = z * 0\n", PRIOR_LEARNING),
    ("ddim_wrong_next_noise_level", "model_diffusion.py",
     "x = abar_next.sqrt() * x0 + (1 - abar_next).sqrt() * eps", "x = abar_next.sqrt() * x0 + (1 - abar).sqrt() * eps",
     GAUSSIAN_SAMPLERS),
    ("v_target_sign", "model_diffusion.py",
     "target = abar.sqrt() * noise - (1 - abar).sqrt() * x0", "target = abar.sqrt() * noise + (1 - abar).sqrt() * x0",
     [SECOND_STAGE + "test_v_target_matches_its_definition"]),
    ("histogram_smoothing_chosen_on_test", "train_viT.py",
     "histogram_nats_per_code(train_codes, validate_codes, num_codes, count)",
     "histogram_nats_per_code(train_codes, test_codes, num_codes, count)",
     [SECOND_STAGE + "test_histogram_baseline_smooths_with_the_pseudo_count_best_on_validate"]),
    ("best_checkpoint_never_placed", "util.py", "_place_copy(tmp_path, also)", "pass",
     ["tests/test_util.py::test_best_checkpoint_is_written_once_and_kept_when_later_epochs_do_not_improve"]),
    ("dead_codes_never_restarted", "module.py", "dead = (self.ema_cluster_size < self.dead_code_threshold)[:, None]",
     "dead = torch.zeros_like(self.ema_cluster_size, dtype=torch.bool)[:, None]",
     ["tests/test_models.py::test_dead_codes_are_restarted_so_the_whole_codebook_is_used"]),
    ("patch_code_reads_itself", "model_prior.py",
     "drawn.cumsum(2) - drawn", "drawn.cumsum(2)", [SECOND_STAGE + "test_patch_prior_reads_codes_in_patch_order"]),
    ("diffusion_validates_every_epoch", "stable_diffusion.py",
     "(epoch + 1) % EVAL_EVERY == 0 or epoch + 1 == EPOCHS", "True",
     [SECOND_STAGE + "test_diffusion_learns_to_use_its_timestep_and_z"]),
    # the detail kurtosis as the fourth moment over the variance, not over its square
    ("kurtosis_unnormalised", "realism.py", "brain_mean(centred ** 4) / (variance ** 2).clamp(min=1e-20)",
     "brain_mean(centred ** 4) / variance.clamp(min=1e-20)",
     ["tests/test_realism.py::test_laplacian_moments_match_scipy_on_real_slices",
      "tests/test_realism.py::test_detail_kurtosis_tells_real_detail_from_gaussian_speckle"]),
    # the search blind to coherence: volumes dealt from unrelated brains tie with real ones
    ("selection_ignores_coherence", "realism.py", '"z_faithfulness", "identity_correlation")', '"z_faithfulness")',
     ["tests/test_realism.py::test_choose_setting_keeps_volumes_one_brain"]),
    # the nucleus one code short: the code that carries it past top_p left out
    ("nucleus_one_code_short", "model_prior.py", "probabilities.cumsum(-1) - probabilities >= top_p",
     "probabilities.cumsum(-1) >= top_p", [SECOND_STAGE + "test_sampled_first_codes_follow_the_softmax_of_their_logits"]),
    # each setting of a search drawn from wherever the generator stands, not from the same seed
    ("settings_drawn_from_different_numbers", "realism.py", "        torch.manual_seed(seed)\n", "",
     ["tests/test_realism.py::test_every_setting_samples_from_the_same_random_numbers"]),
    # a snap temperature in absolute units instead of the nearest code's distance
    ("snap_scale_absolute", "module.py", "(temperature * nearest_distance)", "temperature",
     ["tests/test_models.py::test_snapped_codes_are_drawn_by_proximity"]),
    # the folded U-Net's full-resolution head built and trained but its output dropped
    ("head_output_dropped", "model_diffusion.py", "out = out + self.head(x, F.pixel_shuffle(h, self.patch_size), cond)",
     "out = out + 0 * self.head(x, F.pixel_shuffle(h, self.patch_size), cond)",
     [SECOND_STAGE + "test_full_resolution_head_starts_silent_and_learns"]),
    # the off-codebook share over the vectors' summed squares, not their spread about the mean
    ("off_codebook_share_uncentred", "model_VAE.py", "(latents - latents.mean((0, 2, 3), keepdim=True)).pow(2).sum()",
     "latents.pow(2).sum()", ["tests/test_models.py::test_off_codebook_share_against_exact_distances"]),
    ("detail_loss_on_energy_not_rms", "pre_train.py", "DETAIL_WINDOW) + 1e-8).sqrt()", "DETAIL_WINDOW) + 1e-8)",
     [PRE_TRAIN + "test_detail_energy_loss_gives_a_blurred_image_its_detail_back"] + GENERATOR_LOSS),
    ("prior_loss_against_raster_codes", "model_prior.py", "return nats_per_code(logits, patches)",
     "return nats_per_code(logits, codes)",
     [SECOND_STAGE + "test_training_loss_is_each_codes_negative_log_likelihood"]),
    ("nearest_code_forgets_its_block", "module.py", "return best_block * block + blocks[", "return blocks[",
     ["tests/test_models.py::test_two_level_argmin_is_argmin_ties_included",
      "tests/test_models.py::test_quantizer_picks_the_nearest_code_and_passes_gradients_straight_through"]),
    # a scan's brain mask read and then not applied; the masks sorted apart from their scans
    ("brain_mask_ignored", "dataset.py", "data = np.where(mask > 0, data, 0)", "data = data",
     ["tests/test_dataset.py::test_a_brain_mask_strips_the_skull_of_a_scan"]),
    ("masks_sorted_apart_from_scans", "dataset.py",
     "paths, masks = zip(*sorted(zip(paths, mask_paths or [None] * len(paths))))",
     "paths, masks = sorted(paths), sorted(mask_paths) or [None] * len(paths)",
     ["tests/test_dataset.py::test_a_brain_mask_strips_the_skull_of_a_scan"]),
    # a converted brain aligned to the template but cut at the template's planes without the alignment
    ("alignment_not_carried_into_the_slices", "dataset.py",
     "        points = points @ to_volume[:3, :3].T + to_volume[:3, 3]\n", "",
     ["tests/test_dataset.py::test_alignment_recovers_a_known_affine_and_cuts_the_template_planes"]),
    # an aligned brain's own frame left in template mm: its slices not laid over its scan
    ("scan_frame_left_in_template_mm", "dataset.py",
     'affine=(to_volume @ np.asarray(template_frame["affine"])).tolist()', 'affine=template_frame["affine"]',
     ["tests/test_dataset.py::test_alignment_recovers_a_known_affine_and_cuts_the_template_planes"]),
    # your brains written as scored and reconstructed under ids 1..V, and in the template's mm, not their scans'
    ("scored_brains_renumbered_from_one", "score_scans.py", " brain_ids=brains,", "",
     [SECOND_STAGE + "test_score_scans_on_a_converted_nifti_volume"]),
    ("reconstructions_in_the_shared_frame", "dataset.py", "        affines.update(own)\n", "",
     [SECOND_STAGE + "test_score_scans_on_a_converted_nifti_volume"]),
    # your brains scored at their own intensity scale, whatever MATCH_INTENSITY says
    ("intensities_left_unmatched", "score_scans.py",
     "volume[brain] = torch.from_numpy(np.interp(values, np.quantile(values, levels), target)).to(volume.dtype)",
     "pass", [SECOND_STAGE + "test_intensity_matching_undoes_a_scanners_intensity_curve"]),
    # a one-process script left to run once per torchrun process
    ("one_process_scripts_run_under_torchrun", "util.py",
     "if world_size > 1 and not torch.distributed.is_initialized():", "if False:",
     ["tests/test_user_errors.py::test_a_one_process_script_under_torchrun_says_so",
      "tests/test_user_errors.py::test_torchrun_of_a_one_process_script_stops_with_the_sentence"]),
    # every torchrun process going on past training, to test and sample again and to shut Python down
    ("other_processes_go_on_after_training", "util.py", "    if not is_main:\n        _exit_now(0)\n", "",
     ["tests/test_util.py::test_only_the_main_process_goes_on_after_training"]),
    # every upper-case global settable again (NUM_Z, SHAPE_KEYS), and --help without its continued comments
    ("constants_outside_the_config_block_settable", "util.py", "                block = {}\n", "                block = None\n",
     ["tests/test_util.py::test_only_the_config_block_is_settable_and_help_lists_it_with_its_comments",
      "tests/test_user_errors.py::test_help_lists_the_settings_as_a_preset_leaves_them_and_runs_nothing"]),
    ("help_drops_continued_comments", "util.py", "and name and token.start[1] > 0:",
     "and name and not token.line.lstrip().startswith(\"#\"):",
     ["tests/test_util.py::test_only_the_config_block_is_settable_and_help_lists_it_with_its_comments"]),
    # `--help | head` ends in Python's report of the closed pipe when the help is flushed at exit
    ("help_flushed_again_at_exit", "util.py", "os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())", "pass",
     ["tests/test_user_errors.py::test_help_into_a_reader_that_stopped_ends_quietly"]),
    # DDP's spurious warning on the attention projection's gradient strides back in every torchrun run
    ("ddp_stride_warning_shown", "util.py",
     'warnings.filterwarnings("ignore", message="Grad strides do not match bucket view strides")', "pass",
     [SECOND_STAGE + "test_torchrun_two_processes"]),
    # pictures and generated volumes truncated to a grey level, not rounded
    ("grey_levels_truncated", "util.py", ".mul(255).add(0.5).to(torch.uint8)", ".mul(255).to(torch.uint8)",
     ["tests/test_dataset.py::test_written_volumes_read_back_to_a_grey_level_and_replace_no_other_folder",
      "tests/test_util.py::test_picture_grid_holds_torchvisions_grey_levels_in_one_channel"]),
    # generated volumes' NIfTI frame: rows running posterior to anterior, and resized slices half a pixel off
    ("slice_frame_rows_flipped", "dataset.py", "np.diag([pixel_mm, -pixel_mm,", "np.diag([pixel_mm, pixel_mm,",
     ["tests/test_dataset.py::test_the_slice_frame_lays_the_slices_on_the_template_in_mm"]),
    ("resized_frame_half_a_pixel_off", "dataset.py", "    resize[:2, 3] = (factor - 1) / 2\n", "",
     ["tests/test_dataset.py::test_a_resized_frame_puts_each_voxel_at_the_centre_of_those_it_averages"]),
    # a brain in two split folders caught only when one mode loads both; 16-bit slices clipped; slice 32 let in
    ("splits_checked_only_within_a_mode", "dataset.py", "        check_splits_hold_different_brains(self.data_dir)\n",
     "", ["tests/test_dataset.py::test_brain_in_two_splits"]),
    ("png_16_bit_clipped", "dataset.py", 'if image.mode.startswith("I"):', "if False:",
     ["tests/test_dataset.py::test_16_bit_pngs_are_scaled_to_8_bits_not_clipped"]),
    ("slice_past_the_last_let_in", "dataset.py", "if int(match[2]) >= SLICES_PER_BRAIN:", "if False:",
     ["tests/test_dataset.py::test_slice_past_the_brains_last_is_named"]),
    # the reference's per-z memorisation threshold indexed as if per volume (more than 32 reference brains fail)
    ("memorisation_threshold_indexed_per_volume", "realism.py",
     'if name not in ("same_z_ssim", "memorisation_threshold") and value', 'if name != "same_z_ssim" and value',
     ["tests/test_realism.py::test_a_reference_of_more_brains_than_slices_a_brain_scores_itself_as_real"]),
    # the critic's decoder doubling each level, which misses a skip pooled down from an odd size
    ("critic_upsamples_by_two", "model_critic.py", "F.interpolate(h, size=skip.shape[-2:], mode=",
     "F.interpolate(h, scale_factor=2.0, mode=", ["tests/test_realism.py::test_critic_reads_any_image_size"]),
    # train_critic.py resuming the finished critic of other files that bears the same folder name
    ("critic_of_other_files_resumed", "train_critic.py",
     "        model_critic.refuse_other_data(checkpoint, path, data_dir, IMG_SIZE)", "        pass",
     ["tests/test_realism.py::test_critic_follows_its_data_when_moved_and_refuses_other_data_or_size"]),
    # predict.py's first stage left in training mode after the test SSIM, moving its codebook as it encodes
    ("evaluation_leaves_the_model_training", "model_VAE.py", "model.train(was_training)", "model.train()",
     ["tests/test_models.py::test_evaluating_reconstructions_leaves_the_model_in_its_mode_and_its_codebook_alone"]),
    # every torchrun process resumed with the main one's generators
    ("processes_resumed_with_the_main_generators", "util.py", "if every_process is not None and len(every_process)",
     "if False and len(every_process)", [PRE_TRAIN + "test_torchrun_two_processes_train_and_resume_as_one_run"]),
    # every torchrun process seeded alike, drawing the same random latents and noise as the others
    ("processes_seeded_alike", "util.py", "    seed += world_size_and_rank()[1]\n", "",
     ["tests/test_util.py::test_torchrun_processes_draw_their_own_random_numbers_from_models_alike"]),
    # a constant's type taken from whatever an earlier argument set; a None default parsing "2024" as a number
    ("types_from_the_current_value", "util.py", "            default = defaults[name]\n",
     "            default = namespace[name]\n",
     ["tests/test_util.py::test_types_come_from_the_scripts_defaults_whatever_set_the_constant_before"]),
    ("none_defaults_take_any_literal", "util.py", "((type(None), str) if default is None else",
     "((type(None),) if default is None else",
     ["tests/test_util.py::test_types_come_from_the_scripts_defaults_whatever_set_the_constant_before"]),
    # a None default taking True / False as bools, so --DATA_DIR=True was the bool True, not a folder
    ("none_defaults_take_bools", "util.py", "((type(None), str) if default is None else",
     "((type(None), bool, str) if default is None else",
     ["tests/test_util.py::test_types_come_from_the_scripts_defaults_whatever_set_the_constant_before"]),
    # processes building the demo brains at once (torchrun's) sharing one temporary folder, each clearing it as it
    # begins, and each replacing whatever folder it finds at the end: the code before the fix, and each half of it
    ("demo_builds_share_a_folder_and_replace", "dataset.py",
     "partial = f\"{out_dir.rstrip('/')}.partial-{os.getpid()}\"",
     "partial = out_dir.rstrip('/') + '.partial'; replace = True",
     ["tests/test_dataset.py::test_processes_building_the_demo_brains_at_once_leave_them_whole"]),
    ("demo_builds_share_a_temporary_folder", "dataset.py",
     "partial = f\"{out_dir.rstrip('/')}.partial-{os.getpid()}\"", "partial = out_dir.rstrip('/') + '.partial'",
     ["tests/test_dataset.py::test_processes_building_the_demo_brains_at_once_leave_them_whole"]),
    ("demo_build_replaces_a_finished_folder", "dataset.py", 'info, "DEMO_DIR", replace=False)', 'info, "DEMO_DIR")',
     ["tests/test_dataset.py::test_processes_building_the_demo_brains_at_once_leave_them_whole"]),
    # processes started at once on a fresh checkout each building the demo brains, not waiting for the first's
    ("demo_build_takes_no_lock", "dataset.py", "fcntl.flock(lock, fcntl.LOCK_EX)", "pass",
     ["tests/test_dataset.py::test_one_process_builds_the_demo_brains_while_the_others_wait"]),
    # a killed demo build's temporary folder left for good
    ("killed_demo_build_folder_kept", "dataset.py", "shutil.rmtree(stale, ignore_errors=True)", "pass",
     ["tests/test_dataset.py::test_one_process_builds_the_demo_brains_while_the_others_wait"]),
    # a file system that refuses locks: the demo build stopping, or clearing another process's build under way
    ("refused_demo_lock_stops_the_build", "dataset.py", "        except OSError:\n            locked = False\n",
     "        finally:\n            locked = False\n",
     ["tests/test_dataset.py::test_a_refused_demo_lock_builds_anyway_and_leaves_other_builds_alone"]),
    ("refused_demo_lock_clears_other_builds", "dataset.py", "            if locked:", "            if True:",
     ["tests/test_dataset.py::test_a_refused_demo_lock_builds_anyway_and_leaves_other_builds_alone"]),
    # seg slices holding the labels themselves (0..3) read as all background
    ("seg_labels_read_as_grey_levels", "dataset.py",
     "grey if grey.max() <= 3 else np.rint(grey / SEG_GREY_STEP)", "np.rint(grey / SEG_GREY_STEP)",
     ["tests/test_dataset.py::test_seg_slices_holding_the_labels_themselves_read_as_labels"]),
    # 16-bit seg slices holding the labels themselves scaled to 8 bits, every label 0; dark 16-bit slices unscaled
    ("seg_labels_in_16_bits_scaled", "dataset.py", "if not (labels and values.max() <= 255):", "if True:",
     ["tests/test_dataset.py::test_seg_slices_holding_the_labels_themselves_read_as_labels[16_bit]"]),
    ("dark_16_bit_slices_kept_unscaled", "dataset.py", "if not (labels and values.max() <= 255):",
     "if not values.max() <= 255:", ["tests/test_dataset.py::test_16_bit_pngs_are_scaled_to_8_bits_not_clipped"]),
    # the main process of a torchrun run ending through Python's shutdown, where gloo's threads can abort it
    ("main_process_ends_through_pythons_shutdown", "util.py",
     "        _exit_now(1)\n    _exit_now(0)\n", "        _exit_now(1)\n",
     ["tests/test_util.py::test_only_the_main_process_goes_on_after_training"]),
    # an error while a torchrun run's main process tests or samples alone going through Python's shutdown
    ("main_process_failing_alone_ends_through_pythons_shutdown", "util.py",
     "    except (Exception, KeyboardInterrupt):\n        traceback.print_exc()\n        _exit_now(1)\n", "",
     ["tests/test_util.py::test_a_main_process_failing_alone_ends_with_status_1_and_its_error[exception]"]),
    # the same for a UserError, ended with status 0 as if the run had finished
    ("user_error_alone_ends_with_status_0", "util.py", "        _exit_now(status or 0)\n", "        _exit_now(0)\n",
     ["tests/test_util.py::test_a_main_process_failing_alone_ends_with_status_1_and_its_error[user_error]"]),
    # the speed race stopped by one contestant that fails, the others never raced
    ("speed_race_stops_at_a_failing_contestant", "bench/first_stage_speed.py", "        except RuntimeError as error:",
     "        except ValueError as error:",
     ["tests/test_bench.py::test_speed_race_reports_a_failing_contestant_and_races_the_others"]),
    # a NIfTI file named twice (overlapping globs) converted as two brains
    ("nifti_files_named_twice_kept_twice", "dataset.py", "paths.setdefault(os.path.realpath(path), path)",
     "paths[os.path.realpath(path)] = path", ["tests/test_dataset.py::test_nifti_files_named_twice_are_one_brain"]),
    # the t-SNE's brain bands shifted half a band: each brain's tick on the border of two colours
    ("tsne_brain_bands_shifted", "predict.py", "BoundaryNorm(np.arange(count + 1) - 0.5, count)",
     "BoundaryNorm(np.arange(count + 1), count)",
     [SECOND_STAGE + "test_tsne_gives_each_brain_its_own_colour_band"]),
    # latents collected from other data recording the first stage's data, which the searches and predict.py score on
    ("latents_record_the_first_stage_data", "latent_dataset.py", 'first_stage_config | {"DATA_DIR": data_dir}',
     "first_stage_config", [SECOND_STAGE + "test_latents_of_other_data_record_it"]),
    # latent collection dropping the train split's last partial batch (a whole brain at an odd brain count)
    ("collection_drops_the_last_batch", "dataset.py", "drop_last=shuffle if drop_last is None else drop_last",
     "drop_last=mode in TRAINING_MODES if drop_last is None else drop_last",
     [SECOND_STAGE + "test_latent_dataset_keeps_the_last_partial_batch"]),
    # a search too small for the Frechet distance ranking without it, unannounced
    ("search_drops_figures_silently", "realism.py", "    if len(metrics) < len(SELECTION_METRICS):\n",
     "    if False:\n", ["tests/test_realism.py::test_choose_setting_says_which_figures_too_few_volumes_cannot_rank"]),
    # the denoising GIF ending on a fresh decode of the last state, not the volume scored
    ("gif_ends_on_a_fresh_decode", "predict.py",
     "for state in states[:-1]] + [util.image_grid(sampled)])", "for state in states])",
     [SECOND_STAGE + "test_diffusion_training_improves_and_predict_pictures_everything"]),
    # the VAE's t-SNE fed log-variances beside the means
    ("tsne_of_means_and_log_variances", "predict.py", "plot_tsne(diffusion_latents(collected),",
     'plot_tsne(collected["latents"],', [SECOND_STAGE + "test_vae_pipeline_diffuses_posterior_means_and_predicts"]),
    # the KL weight (~1e-6) back on the adaptive GAN weight's axis, a flat line at 0; the detail loss unplotted
    ("kl_weight_on_the_gan_weights_axis", "logger.py",
     '    "adaptive GAN weight": ("adaptive_weight",),\n    "KL weight (cyclical annealing)": ("kl_weight",),\n',
     '    "balancing weights": ("adaptive_weight", "kl_weight"),\n', ["tests/test_logger.py"]),
    ("detail_loss_unplotted", "logger.py", '"reconstruction": ("rec_loss", "detail_loss"),',
     '"reconstruction": ("rec_loss",),', [PRE_TRAIN + "test_generator_loss_is_the_sum_of_its_terms"]),
    # torchrun logging the main process's share of the batch, not the loss DDP optimises
    ("torchrun_logs_the_main_share", "util.py", "if world_size > 1 and stacked:", "if False:",
     ["tests/test_util.py::test_torchrun_logs_the_mean_over_processes_of_each_step"]),
    # an all-background brain reaching numpy's quantiles of nothing
    ("empty_brain_unnamed", "score_scans.py", "        if not brain.any():\n", "        if False:\n",
     [SECOND_STAGE + "test_intensity_matching_undoes_a_scanners_intensity_curve"]),
    # a finished prior resumed, and sampled, on the codes of a first stage retrained since
    ("second_stage_on_changed_codes", "latent_dataset.py", "now is not None and trained_on != now:",
     "now is not None and False:",
     [SECOND_STAGE + "test_second_stages_refuse_the_latents_of_a_first_stage_changed_since"]),
    # a bench script that takes --help for nothing and starts deleting and retraining its runs
    ("bench_ignores_help", "bench/first_stage_quality.py", "    util.apply_overrides(globals())\n", "",
     ["tests/test_bench.py::test_every_bench_script_answers_help_and_runs_nothing"]),
]


def snapshot(destination, working_tree):
    """HEAD's files into `destination`; with `working_tree`, the tracked files and the untracked,
    unignored ones as they are now."""
    if not working_tree:
        archive = subprocess.run(["git", "archive", "HEAD"], cwd=ROOT, capture_output=True, check=True).stdout
        subprocess.run(["tar", "-x", "-C", destination], input=archive, check=True)
        return
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                            capture_output=True, check=True).stdout.decode().split("\0")
    for path in filter(None, listed):
        source = os.path.join(ROOT, path)
        if os.path.isfile(source):             # a deleted, not yet committed file is still listed
            os.makedirs(os.path.dirname(os.path.join(destination, path)), exist_ok=True)
            shutil.copy2(source, os.path.join(destination, path))


def check_old_texts(mutations, tree):
    for name, path, old, _, _ in mutations:
        with open(os.path.join(tree, path)) as f:
            count = f.read().count(old)
        if count != 1:
            raise SystemExit(f"mutation {name}: its old text occurs {count} times in {path}, not once; "
                             f"update the mutation to the code: {old!r}")


def run_tests(tree, targets, mutation=None):
    """Run pytest on `targets` in a fresh copy of `tree`, with `mutation` (path, old, new) applied:
    (returncode, the failed test ids, erroring ones marked "(error)", seconds)."""
    with tempfile.TemporaryDirectory(prefix="mutation-") as copy:
        shutil.copytree(tree, copy, dirs_exist_ok=True)
        if mutation:
            path, old, new = mutation
            with open(os.path.join(copy, path)) as f:
                text = f.read()
            with open(os.path.join(copy, path), "w") as f:
                f.write(text.replace(old, new))
        start = time.time()
        try:
            result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rfE", "--tb=no", "-p", "no:cacheprovider",
                                     *targets], cwd=copy, capture_output=True, text=True, timeout=TIMEOUT_SECONDS)
        except subprocess.TimeoutExpired:
            return None, ["(timed out)"], time.time() - start
    failed = [line.split()[1] + (" (error)" if line.startswith("ERROR ") else "")
              for line in result.stdout.splitlines() if line.startswith(("FAILED ", "ERROR "))]
    if result.returncode not in (0, 1):        # collection errors, crashes: show why
        failed = failed or [f"(pytest exit {result.returncode}: {result.stdout.strip().splitlines()[-1:]})"]
    return result.returncode, failed, time.time() - start


if __name__ == "__main__":
    arguments = sys.argv[1:]
    full, working_tree = "--full" in arguments, "--working-tree" in arguments
    names = [a for a in arguments if a not in ("--full", "--working-tree")]
    unknown = set(names) - {m[0] for m in MUTATIONS}
    if unknown:
        raise SystemExit(f"unknown mutations {sorted(unknown)}; known: {', '.join(m[0] for m in MUTATIONS)}")
    chosen = [m for m in MUTATIONS if not names or m[0] in names]
    all_targets = ["tests"] if full else sorted({target for m in chosen for target in m[4]})
    rows = []
    with tempfile.TemporaryDirectory(prefix="mutation-tree-") as tree:
        snapshot(tree, working_tree)
        check_old_texts(chosen, tree)
        returncode, failed, seconds = run_tests(tree, all_targets)
        print(f"unmutated: {len(all_targets)} target(s), {'pass' if returncode == 0 else 'FAIL'} in {seconds:.0f} s",
              flush=True)
        if returncode != 0:
            raise SystemExit(f"the tests fail without any mutation, so the check means nothing: {failed}")
        for name, path, old, new, targets in chosen:
            returncode, failed, seconds = run_tests(tree, ["tests"] if full else targets, (path, old, new))
            rows.append((name, path, failed))
            print(f"{name}: {'caught by ' + ', '.join(failed) if failed else 'NOT CAUGHT'} ({seconds:.0f} s)",
                  flush=True)
    print(f"\n| mutation | file | caught by ({'whole suite' if full else 'its tests'}) |\n| --- | --- | --- |")
    for name, path, failed in rows:
        print(f"| {name} | {path} | {'<br>'.join(failed) if failed else '**not caught**'} |")
    survivors = [name for name, _, failed in rows if not failed]
    print(f"\n{len(rows) - len(survivors)} of {len(rows)} mutations caught"
          + (f"; survivors: {', '.join(survivors)}" if survivors else ""))
    sys.exit(1 if survivors else 0)
