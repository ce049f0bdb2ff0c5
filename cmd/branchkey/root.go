package main

import (
	"github.com/branchkey/branchkey"
	"github.com/spf13/cobra"
)

func newRootCmd() *cobra.Command {
	root := &cobra.Command{
		Use:   "branchkey",
		Short: "Federated averaging of model weights across training sites",
		Long: `branchkey aggregates the model weights that training sites (leaves) upload,
round after round, and tells every leaf over RabbitMQ or Server-Sent Events
when a new aggregate is ready to download.

Start with "branchkey demo". Run "branchkey serve" for the server.`,
		Version:       branchkey.Version,
		SilenceUsage:  true,
		SilenceErrors: true,
	}
	root.AddCommand(
		newDemoCmd(),
		newInspectCmd(),
		newServeCmd(),
		newAdminCmd(),
		newLeafCmd(),
		newAggregateCmd(),
	)
	return root
}
