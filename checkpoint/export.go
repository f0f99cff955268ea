package checkpoint

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"path/filepath"

	"golang.org/x/sys/unix"

	"github.com/stasis-k8s/stasis/internal/confine"
	"github.com/stasis-k8s/stasis/internal/flagenv"
)

// Subcommand is `stasis checkpoint`, tools on checkpoints for a node's root; ExportCommand its
// `export`.
const (
	Subcommand    = "checkpoint"
	ExportCommand = "export"
)

// Run is `stasis checkpoint <command>`.
func Run(ctx context.Context, args []string) error {
	if len(args) == 0 || args[0] != ExportCommand {
		fmt.Fprintf(os.Stderr, "Usage: stasis %s %s --key-file <agent key> <checkpoint dir> <out dir>\n", Subcommand, ExportCommand)
		return fmt.Errorf("%s: unknown or missing command (want %q)", Subcommand, ExportCommand)
	}
	fs := flag.NewFlagSet(Subcommand+" "+ExportCommand, flag.ContinueOnError)
	keyFile := fs.String("key-file", "", "the agents' manifest key file (agent --manifest-key-file, by default its --tls-key-file): the store's keys are derived from it")
	fs.Usage = func() {
		fmt.Fprintf(fs.Output(), "Usage: stasis %s %s --key-file <file> <checkpoint dir> <out dir>\n\n"+
			"Verifies a checkpoint and writes its CRIU images as plain files (readable by crit) into <out dir>,\n"+
			"which must not exist or be empty. Run on the node, as root.\n\n", Subcommand, ExportCommand)
		fs.PrintDefaults()
	}
	if err := flagenv.Parse(fs, args[1:]); err != nil {
		return err
	}
	if fs.NArg() != 2 || *keyFile == "" {
		fs.Usage()
		return errors.New("export: --key-file, a checkpoint directory and an output directory are required")
	}
	ring, err := KeyRingFromFile(*keyFile)
	if err != nil {
		return fmt.Errorf("export: %w", err)
	}
	n, size, err := Export(ctx, fs.Arg(0), fs.Arg(1), ring)
	if err != nil {
		return fmt.Errorf("export: %w", err)
	}
	fmt.Printf("exported %d images (%d bytes) of %s to %s\n", n, size, fs.Arg(0), fs.Arg(1))
	return nil
}

// Export verifies checkpoint ckpt (a complete checkpoint directory, signed with ring's manifest
// key) and writes its CRIU images as plain files into out (created; it must be empty). The
// checkpoint is opened without following a symlink in its last component (a pod writes its
// checkpoint volume); every byte written is verified first, per chunk or per file.
func Export(ctx context.Context, ckpt, out string, ring *KeyRing) (images int, bytes int64, err error) {
	parent, err := os.Open(filepath.Dir(ckpt))
	if err != nil {
		return 0, 0, err
	}
	defer parent.Close()
	id := filepath.Base(ckpt)
	d, err := confine.OpenEntry(parent, id, unix.O_RDONLY|unix.O_DIRECTORY)
	if err != nil {
		return 0, 0, err
	}
	defer d.Close()
	m, err := CheckAt(d, id, ring.Manifest())
	if err != nil {
		return 0, 0, fmt.Errorf("%s: %w", ckpt, err)
	}
	od, err := emptyDir(out)
	if err != nil {
		return 0, 0, err
	}
	defer od.Close()
	if m.Pack == nil {
		err = CopyImagesAt(d, m, od)
		for _, f := range m.Files {
			if isImage(f.Path) {
				images, bytes = images+1, bytes+f.Size
			}
		}
		return images, bytes, err
	}
	r, err := OpenPack(parent, m, ring)
	if err != nil {
		return 0, 0, err
	}
	defer r.Close()
	for _, name := range r.Names() {
		if err := ctx.Err(); err != nil {
			return images, bytes, err
		}
		n, err := exportImage(r, name, od)
		if err != nil {
			return images, bytes, err
		}
		images, bytes = images+1, bytes+n
	}
	return images, bytes, nil
}

// emptyDir creates out (0700) or opens it if it exists and is empty.
func emptyDir(out string) (*os.File, error) {
	if err := os.Mkdir(out, 0o700); err != nil && !errors.Is(err, os.ErrExist) {
		return nil, err
	}
	od, err := os.OpenFile(out, os.O_RDONLY|unix.O_DIRECTORY|unix.O_NOFOLLOW, 0)
	if err != nil {
		return nil, err
	}
	if names, err := od.Readdirnames(1); err != io.EOF {
		od.Close()
		return nil, errors.Join(err, fmt.Errorf("%s: not empty (%v)", out, names))
	}
	return od, nil
}

func exportImage(r *PackReader, name string, od *os.File) (int64, error) {
	src, err := r.Open(name)
	if err != nil {
		return 0, err
	}
	defer src.Close()
	dst, err := confine.CreateEntry(od, name, 0o600)
	if err != nil {
		return 0, err
	}
	n, err := io.CopyBuffer(dst, src, make([]byte, 1<<20))
	if cerr := dst.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		return n, fmt.Errorf("exporting %s: %w", name, err)
	}
	return n, nil
}
