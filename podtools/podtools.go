// Package podtools holds the commands Stasis' init-containers run inside a wired pod:
// `stasis tools-install` stages the stasis binary and the CRIU bundle into the tools volume, and
// `stasis restore-prepare` checks the checkpoints a pod's containers will restore and writes their plans.
package podtools

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path"
	"path/filepath"
	"strings"

	"github.com/rs/zerolog"

	"github.com/stasis-k8s/stasis/checkpoint"
	"github.com/stasis-k8s/stasis/internal/flagenv"
	"github.com/stasis-k8s/stasis/wiring"
)

// ImageCriuBundle is where the Stasis image keeps the CRIU bundle (wrapper `criu` beside `root/`).
const ImageCriuBundle = "/usr/local/lib/stasis/criu"

// ToolsInstall is `stasis tools-install --dest DIR`: DIR/stasis (this binary), DIR/criu/ (the CRIU
// bundle, run through its own loader so it works in any image) and DIR/restore/ (restore plans).
func ToolsInstall(_ context.Context, args []string) error {
	fs := flag.NewFlagSet("tools-install", flag.ContinueOnError)
	dest := fs.String("dest", wiring.ToolsMount, "directory to fill (the tools volume)")
	bundle := fs.String("criu-bundle", ImageCriuBundle, "CRIU bundle to copy (a directory with the wrapper `criu` and `root/`)")
	if err := flagenv.Parse(fs, args); err != nil {
		return err
	}
	self, err := os.Executable()
	if err != nil {
		return err
	}
	if err := os.MkdirAll(*dest, 0o755); err != nil {
		return err
	}
	if err := copyFile(self, filepath.Join(*dest, "stasis"), 0o755); err != nil {
		return fmt.Errorf("tools-install: copying the stasis binary: %w", err)
	}
	if _, err := os.Stat(filepath.Join(*bundle, "criu")); err != nil {
		return fmt.Errorf("tools-install: --criu-bundle %s has no criu wrapper: %w", *bundle, err)
	}
	if err := copyDir(*bundle, filepath.Join(*dest, "criu")); err != nil {
		return fmt.Errorf("tools-install: copying the CRIU bundle: %w", err)
	}
	if err := os.MkdirAll(filepath.Join(*dest, path.Base(wiring.RestorePlanDir)), 0o755); err != nil {
		return err
	}
	fmt.Fprintf(os.Stderr, "stasis tools installed in %s\n", *dest)
	return nil
}

func copyFile(src, dst string, mode os.FileMode) error {
	in, err := os.Open(src)
	if err != nil {
		return err
	}
	defer in.Close()
	tmp := dst + ".tmp"
	out, err := os.OpenFile(tmp, os.O_WRONLY|os.O_CREATE|os.O_TRUNC, mode)
	if err != nil {
		return err
	}
	if _, err := io.Copy(out, in); err != nil {
		out.Close()
		return err
	}
	if err := out.Close(); err != nil {
		return err
	}
	if err := os.Chmod(tmp, mode); err != nil {
		return err
	}
	return os.Rename(tmp, dst)
}

func copyDir(src, dst string) error {
	return filepath.WalkDir(src, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		rel, _ := filepath.Rel(src, p)
		target := filepath.Join(dst, rel)
		fi, err := d.Info()
		if err != nil {
			return err
		}
		switch {
		case d.IsDir():
			return os.MkdirAll(target, fi.Mode().Perm()|0o700)
		case d.Type()&fs.ModeSymlink != 0:
			l, err := os.Readlink(p)
			if err != nil {
				return err
			}
			_ = os.Remove(target)
			return os.Symlink(l, target)
		case d.Type().IsRegular():
			return copyFile(p, target, fi.Mode().Perm())
		}
		return nil // sockets, devices: not part of a bundle
	})
}

// RestorePrepare is `stasis restore-prepare`: for each container in --restore-containers, check
// checkpoint --restore-id below its checkpoint directory (see PreparePod) and write its
// wiring.RestorePlan. It fails only when it cannot write plans: a bad checkpoint is a plan with
// Restore=false, which the launcher turns into a cold start (never a crash loop).
func RestorePrepare(_ context.Context, args []string) error {
	fs := flag.NewFlagSet("restore-prepare", flag.ContinueOnError)
	identity := fs.String("identity", "", "checkpoint identity of the pod")
	id := fs.String("restore-id", "", "checkpoint ID to restore")
	containers := fs.String("restore-containers", "", "comma-separated containers to prepare")
	root := fs.String("checkpoint-root", wiring.CheckpointMount, "where the checkpoint volume is mounted")
	planDir := fs.String("plan-dir", wiring.RestorePlanDir, "where to write <container>.json plans")
	if err := flagenv.Parse(fs, args); err != nil {
		return err
	}
	log := zerolog.New(os.Stderr).With().Timestamp().Str("component", "stasis-restore").Logger()
	if *containers == "" {
		return errors.New("restore-prepare: --restore-containers ($STASIS_RESTORE_CONTAINERS) is empty")
	}
	if *identity == "" {
		return errors.New("restore-prepare: --identity ($STASIS_IDENTITY) is empty")
	}
	if err := os.MkdirAll(*planDir, 0o755); err != nil {
		return fmt.Errorf("restore-prepare: %w", err)
	}
	var names []string
	for _, c := range strings.Split(*containers, ",") {
		if c = strings.TrimSpace(c); c != "" {
			names = append(names, c)
		}
	}
	plans := PreparePod(filepath.Join(*root, wiring.IdentityDir(*identity)), *id, names)
	for i, c := range names {
		plan := plans[i]
		ev := log.Info()
		if !plan.Restore {
			ev = log.Warn()
		}
		ev.Str("container", c).Str("checkpoint", plan.Dir).Bool("restore", plan.Restore).Str("reason", plan.Reason).Msg("restore plan")
		b, _ := json.MarshalIndent(plan, "", "  ")
		if err := os.WriteFile(filepath.Join(*planDir, c+".json"), b, 0o644); err != nil {
			return fmt.Errorf("restore-prepare: writing the plan for %s: %w", c, err)
		}
	}
	return nil
}

// PreparePod returns the plans of a pod's restoring containers (checkpoints below identityDir/<c>).
// The containers of a pod restore together or not at all: one restored beside a sibling that
// starts cold would see a partner whose state went back to zero. With several containers the
// images are verified here, before any of them starts, so that a corrupt image cannot split them
// in the launchers either; a single container leaves its images to its launcher (checked while
// CRIU restores, which costs no time).
func PreparePod(identityDir, id string, containers []string) []wiring.RestorePlan {
	plans := make([]wiring.RestorePlan, len(containers))
	failed := -1
	for i, c := range containers {
		plans[i] = Prepare(filepath.Join(identityDir, c), id, len(containers) > 1)
		if !plans[i].Restore && failed < 0 {
			failed = i
		}
	}
	if failed >= 0 {
		why := fmt.Sprintf("container %s cannot restore (%s): the containers of a pod restore together or not at all", containers[failed], plans[failed].Reason)
		for i := range plans {
			if i != failed {
				plans[i].Restore, plans[i].Reason, plans[i].ImagesVerified = false, why, false
			}
		}
	}
	return plans
}

// Prepare checks checkpoint id below a container's checkpoint directory and returns the plan;
// with verifyImages, the CRIU images' sha256 too.
func Prepare(dir, id string, verifyImages bool) wiring.RestorePlan {
	plan := wiring.RestorePlan{Dir: filepath.Join(dir, id), ID: id}
	if !checkpoint.ValidID(id) {
		plan.Reason = fmt.Sprintf("restore id %q is not a valid checkpoint id", id)
		return plan
	}
	check := checkpoint.Check
	if verifyImages {
		check = checkpoint.Verify
	}
	if _, err := check(plan.Dir); err != nil {
		switch {
		case errors.Is(err, checkpoint.ErrIncomplete):
			plan.Reason = "partial checkpoint: " + err.Error()
		case errors.Is(err, fs.ErrNotExist) || strings.Contains(err.Error(), "does not exist"):
			plan.Reason = "missing checkpoint: " + err.Error()
		default:
			plan.Reason = "corrupt checkpoint: " + err.Error()
		}
		return plan
	}
	plan.Restore, plan.ImagesVerified = true, verifyImages
	return plan
}
