package checkpoint

import "io"

// The data path between CRIU and the checkpoint volume (issue 16): CRIU streams its images to the
// agent and reads them back from it, so the agent can compress, encrypt, deduplicate and verify
// them on the way, and never hands CRIU a byte it has not verified.

// ImageSink receives a dump's images one file at a time, in the order CRIU writes them.
type ImageSink interface {
	// Create starts image name ("pages-1.img", "files.img", …: a plain file name, no directory).
	// The writer gets the image's bytes in order; Close ends the image, and an error from Write
	// or Close fails the dump.
	Create(name string) (io.WriteCloser, error)
}

// ImageSource serves a verified checkpoint's images to CRIU at restore.
type ImageSource interface {
	// Open returns image name's bytes. Every byte the reader returns has been verified against the
	// signed manifest before it is returned (per chunk); a mismatch is an error, never data. A
	// name the checkpoint does not hold gives an error wrapping os.ErrNotExist.
	Open(name string) (io.ReadCloser, error)
	// Names lists the checkpoint's images.
	Names() []string
}

// ImageReaderAt gives random access to a checkpoint's images, verified per chunk as above: what
// a lazy restore needs to serve a faulting page.
type ImageReaderAt interface {
	// OpenAt returns image name for random access and its size.
	OpenAt(name string) (ReaderAtCloser, int64, error)
}

// ReaderAtCloser is an io.ReaderAt that holds resources.
type ReaderAtCloser interface {
	io.ReaderAt
	io.Closer
}
